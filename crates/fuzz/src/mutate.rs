//! Byte-level mutations of seed files, as proptest strategies (so failures shrink to few, small
//! mutations of the smallest seed).

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

/// Boundary values a corrupt or crafted header field is likely to hold.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x1_0000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    (1 << 36) - 1,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// A value for a header field: mostly boundaries, sometimes anything.
pub fn field_value() -> impl Strategy<Value = u64> {
    prop_oneof![3 => select(INTERESTING), 1 => any::<u64>()]
}

/// A position as a fraction of the input's length (`u32` / 2^32), so it fits inputs of any size
/// and shrinks toward the start.
#[derive(Debug, Clone, Copy)]
pub struct Frac(pub u32);

impl Frac {
    /// The position in `0..len`; `len` must not be 0.
    pub fn index(self, len: usize) -> usize {
        ((self.0 as u64 * len as u64) >> 32) as usize
    }
}

fn frac() -> impl Strategy<Value = Frac> {
    any::<u32>().prop_map(Frac)
}

/// Where a mutation lands: headers sit in the first bytes, so half the mutations aim there.
#[derive(Debug, Clone)]
pub enum Pos {
    Header(u8),
    Anywhere(Frac),
}

impl Pos {
    fn resolve(&self, len: usize) -> Option<usize> {
        match self {
            _ if len == 0 => None,
            Pos::Header(p) => Some(*p as usize % len.min(96)),
            Pos::Anywhere(i) => Some(i.index(len)),
        }
    }
}

fn pos() -> impl Strategy<Value = Pos> {
    prop_oneof![
        (0u8..96).prop_map(Pos::Header),
        frac().prop_map(Pos::Anywhere)
    ]
}

#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit {
        at: Pos,
        bit: u8,
    },
    SetByte {
        at: Pos,
        value: u8,
    },
    /// Overwrites a 2-, 4- or 8-byte word (little or big endian) with a header-like value.
    Word {
        at: Pos,
        width: u8,
        big_endian: bool,
        value: u64,
    },
    Truncate {
        keep: Frac,
    },
    Insert {
        at: Pos,
        bytes: Vec<u8>,
    },
    Remove {
        at: Pos,
        len: u16,
    },
    /// Copies `len` bytes from one place over another (repeated structures, shifted fields).
    Copy {
        from: Frac,
        to: Pos,
        len: u16,
    },
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (pos(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (pos(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        (
            pos(),
            select(&[2u8, 4, 8][..]),
            any::<bool>(),
            field_value()
        )
            .prop_map(|(at, width, big_endian, value)| Mutation::Word {
                at,
                width,
                big_endian,
                value
            }),
        frac().prop_map(|keep| Mutation::Truncate { keep }),
        (pos(), vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (pos(), 1u16..512).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (frac(), pos(), 1u16..256).prop_map(|(from, to, len)| Mutation::Copy { from, to, len }),
    ]
}

/// One to six mutations.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    vec(mutation(), 1..6)
}

impl Mutation {
    pub fn apply(&self, b: &mut Vec<u8>) {
        let len = b.len();
        match self {
            Mutation::FlipBit { at, bit } => {
                if let Some(p) = at.resolve(len) {
                    b[p] ^= 1 << bit;
                }
            }
            Mutation::SetByte { at, value } => {
                if let Some(p) = at.resolve(len) {
                    b[p] = *value;
                }
            }
            Mutation::Word {
                at,
                width,
                big_endian,
                value,
            } => {
                let w = *width as usize;
                let Some(p) = at.resolve(len).filter(|p| p + w <= len) else {
                    return;
                };
                let bytes = if *big_endian {
                    value.to_be_bytes()[8 - w..].to_vec()
                } else {
                    value.to_le_bytes()[..w].to_vec()
                };
                b[p..p + w].copy_from_slice(&bytes);
            }
            Mutation::Truncate { keep } => b.truncate(keep.index(len + 1)),
            Mutation::Insert { at, bytes } => {
                let p = at.resolve(len).unwrap_or(0);
                b.splice(p..p, bytes.iter().copied());
            }
            Mutation::Remove { at, len: n } => {
                if let Some(p) = at.resolve(len) {
                    b.drain(p..(p + *n as usize).min(len));
                }
            }
            Mutation::Copy { from, to, len: n } => {
                let (Some(f), Some(t)) = ((len > 0).then(|| from.index(len)), to.resolve(len))
                else {
                    return;
                };
                let n = (*n as usize).min(len - f).min(len - t);
                let chunk = b[f..f + n].to_vec();
                b[t..t + n].copy_from_slice(&chunk);
            }
        }
    }
}

/// The bytes of one fuzz input: a mutated seed, a magic number followed by random bytes, or
/// random bytes alone.
#[derive(Debug, Clone)]
pub enum Input {
    Mutated {
        seed: usize,
        mutations: Vec<Mutation>,
    },
    Magic {
        magic: usize,
        rest: Vec<u8>,
    },
    Random(Vec<u8>),
}

impl Input {
    pub fn bytes(&self, seeds: &[Vec<u8>], magics: &[&[u8]]) -> Vec<u8> {
        match self {
            Input::Mutated { seed, mutations } => {
                let mut b = seeds[*seed].clone();
                for m in mutations {
                    m.apply(&mut b);
                }
                b
            }
            Input::Magic { magic, rest } => {
                let mut b = magics[*magic].to_vec();
                b.extend(rest);
                b
            }
            Input::Random(b) => b.clone(),
        }
    }
}

/// Inputs over `n_seeds` seeds (smallest first: shrinking moves toward index 0) and `n_magics`
/// magic prefixes; most are mutated seeds, since random bytes rarely pass a magic check.
pub fn input(n_seeds: usize, n_magics: usize) -> impl Strategy<Value = Input> {
    assert!(n_seeds > 0 && n_magics > 0);
    prop_oneof![
        8 => (0..n_seeds, mutations()).prop_map(|(seed, mutations)| Input::Mutated { seed, mutations }),
        1 => (0..n_magics, vec(any::<u8>(), 0..256)).prop_map(|(magic, rest)| Input::Magic { magic, rest }),
        1 => vec(any::<u8>(), 0..256).prop_map(Input::Random),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_in_bounds_and_change_bytes() {
        let seed: Vec<u8> = (0..200u8).collect();
        let word = Mutation::Word {
            at: Pos::Header(4),
            width: 4,
            big_endian: true,
            value: 0x0102_0304,
        };
        let mut b = seed.clone();
        word.apply(&mut b);
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        let mut b = seed.clone();
        Mutation::Remove {
            at: Pos::Header(190),
            len: 500,
        }
        .apply(&mut b);
        assert_eq!(b.len(), 190 % 96);
        let mut empty = Vec::new();
        for m in [
            word,
            Mutation::Copy {
                from: Frac(1 << 31),
                to: Pos::Header(3),
                len: 9,
            },
        ] {
            m.apply(&mut empty);
        }
        assert!(empty.is_empty());
    }
}
