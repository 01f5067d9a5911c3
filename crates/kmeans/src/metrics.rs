//! Label agreement: do cluster ids mean the same thing on every client?
//!
//! For one client, take its frames' labels under the codebook it trains with (`a`: its own local
//! codebook in `local` mode) and under a shared global codebook (`b`). From the contingency table
//! `C[i][j]` = frames with `a = i` and `b = j`, map every id `i` to its majority global cluster
//! `m(i) = argmax_j C[i][j]`:
//! * `purity` = share of frames whose global cluster is `m(their id)`: is the client's codebook just a
//!   relabelling of the global one? (high for both local and federated on well-clustered data);
//! * `identity_agreement` = share of frames whose id `i` has `m(i) == i`: does id `i` *denote* global
//!   cluster `i`? This is what a shared prediction head needs. With independent local codebooks ids
//!   are an arbitrary permutation, so it is about 1/k; with the federated codebook it is 1.0;
//! * `raw_agreement` = share of frames with `a == b` (same idea without the majority map).
//!
//! Pooled values weight clients by their frame counts.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug)]
pub struct Contingency {
    pub ka: usize,
    pub kb: usize,
    pub counts: Vec<u64>,
}

impl Contingency {
    pub fn new(ka: usize, kb: usize) -> Self {
        Self {
            ka,
            kb,
            counts: vec![0; ka * kb],
        }
    }
    pub fn add(&mut self, a: u32, b: u32) {
        self.counts[a as usize * self.kb + b as usize] += 1;
    }
    pub fn agreement(&self) -> ClientAgreement {
        let mut frames = 0u64;
        let (mut pure, mut ident, mut raw) = (0u64, 0u64, 0u64);
        for i in 0..self.ka {
            let row = &self.counts[i * self.kb..(i + 1) * self.kb];
            let tot: u64 = row.iter().sum();
            if tot == 0 {
                continue;
            }
            frames += tot;
            // argmax with ties to the lowest id
            let (m, &best) =
                row.iter().enumerate().fold(
                    (0, &row[0]),
                    |acc, (j, c)| if *c > *acc.1 { (j, c) } else { acc },
                );
            pure += best;
            if m == i {
                ident += tot;
            }
            if i < self.kb {
                raw += row[i];
            }
        }
        let f = frames.max(1) as f64;
        ClientAgreement {
            frames,
            purity: pure as f64 / f,
            identity_agreement: ident as f64 / f,
            raw_agreement: raw as f64 / f,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientAgreement {
    pub frames: u64,
    pub purity: f64,
    pub identity_agreement: f64,
    pub raw_agreement: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    pub purity: f64,
    pub identity_agreement: f64,
    pub raw_agreement: f64,
    pub frames: u64,
    pub clients: Vec<(String, ClientAgreement)>,
}

impl Agreement {
    pub fn pool(clients: Vec<(String, ClientAgreement)>) -> Self {
        let frames: u64 = clients.iter().map(|c| c.1.frames).sum();
        let f = frames.max(1) as f64;
        let w = |g: fn(&ClientAgreement) -> f64| {
            clients
                .iter()
                .map(|c| g(&c.1) * c.1.frames as f64)
                .sum::<f64>()
                / f
        };
        Self {
            purity: w(|c| c.purity),
            identity_agreement: w(|c| c.identity_agreement),
            raw_agreement: w(|c| c.raw_agreement),
            frames,
            clients,
        }
    }
}
