//! One time-bounded fuzz target per reader of untrusted files (see the crate docs). Each prints
//! its execution count to stderr; `FEDHUBERT_FUZZ_SECS` sets the seconds per target.

use std::path::{Component, Path};

use fedhubert_audio::partition::{Method, PartitionConfig, partition, write_partition};
use fedhubert_audio::scan::{Corpus, scan_manifest_with};
use fedhubert_audio::{AudioError, Entry, Manifest, ManifestOptions, Split, decode_audio_bytes};
use fedhubert_features::shard::ShardReader;
use fedhubert_fuzz::mutate::{Mutation, field_value, input, mutations};
use fedhubert_fuzz::{fuzz, names_file, seeds};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

/// Decoded audio must be non-empty and finite; errors must name the file.
fn check_decode(name: &str, bytes: &[u8]) -> Result<bool, String> {
    match decode_audio_bytes(Path::new(name), bytes) {
        Ok(a) if a.samples.is_empty() => Err("Ok with no samples".into()),
        Ok(a) if a.samples.iter().any(|s| !s.is_finite()) => Err("non-finite sample".into()),
        Ok(_) => Ok(true),
        Err(e) => names_file(&e.to_string(), name),
    }
}

#[test]
fn fuzz_flac_decoder() {
    let seeds = seeds::flac();
    let magics: [&[u8]; 1] = [b"fLaC"];
    fuzz("flac", input(seeds.len(), magics.len()), |i| {
        check_decode("fuzz.flac", &i.bytes(&seeds, &magics))
    });
}

#[test]
fn fuzz_wav_decoder() {
    let seeds = seeds::wav_files();
    let magics: [&[u8]; 2] = [b"RIFF", b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00"];
    fuzz("wav", input(seeds.len(), magics.len()), |i| {
        check_decode("fuzz.wav", &i.bytes(&seeds, &magics))
    });
}

const COLUMNS: &[&str] = &[
    "id",
    "path",
    "split",
    "num_samples",
    "sample_rate",
    "speaker",
    "chapter",
    "transcript",
    "extra",
];

const CELLS: &[&str] = &[
    "spk/a.wav",
    "spk/../spk/a.wav",
    "./spk/a.wav",
    "../outside.wav",
    "spk/../../outside.wav",
    "/etc/hostname",
    "..",
    ".",
    "",
    "missing.flac",
    "train",
    "valid",
    "TRAIN",
    "4000",
    "3999",
    "0",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "16000",
    "4294967296",
    "\"quoted, cell\"",
    "\"unterminated",
    "ü/ß.wav",
];

/// Cells by column: most cells come from their column's pool, so rows get past the first check.
fn pool(column: &str) -> &'static [&'static str] {
    match column {
        "path" => &CELLS[..10],
        "split" => &CELLS[10..13],
        "num_samples" | "sample_rate" => &CELLS[13..21],
        _ => CELLS,
    }
}

/// A manifest as the reader sees it: a header and rows of cells (unquoted, so commas and quotes
/// in cells make malformed CSV too), byte mutations on top, and one `partition.json` variant.
#[derive(Debug, Clone)]
struct ManifestCase {
    header: Vec<usize>,
    /// (from the column's pool?, index) per cell.
    rows: Vec<Vec<(bool, usize)>>,
    mutations: Vec<Mutation>,
    partition_json: usize,
    allow_outside_root: bool,
}

const PARTITION_JSON: &[&str] = &[
    "",
    "{\"root\": \"root\"}",
    "{\"root\": \"..\"}",
    "{\"root\": 5}",
    "{\"rot\": \"root\"}",
    "[1, 2",
    "{\"root\": \"root\", \"clients\": [{\"client\": -1}]}",
];

fn manifest_case() -> impl Strategy<Value = ManifestCase> {
    // The columns `prepare` writes, in its order, or any columns in any order.
    let canonical: Vec<usize> = (0..8).collect();
    let header = prop_oneof![
        2 => Just(canonical.clone()),
        1 => proptest::sample::subsequence(canonical, 2..8),
        1 => vec(0..COLUMNS.len(), 0..9),
    ];
    (
        header,
        vec(
            vec((prop::bool::weighted(0.85), 0..CELLS.len()), 0..9),
            0..5,
        ),
        prop_oneof![3 => Just(vec![]), 1 => mutations()],
        0..PARTITION_JSON.len(),
        any::<bool>(),
    )
        .prop_map(
            |(header, rows, mutations, partition_json, allow_outside_root)| ManifestCase {
                header,
                rows,
                mutations,
                partition_json,
                allow_outside_root,
            },
        )
}

impl ManifestCase {
    fn text(&self) -> Vec<u8> {
        let line = |cells: Vec<&str>| cells.join(",") + "\n";
        let names: Vec<&str> = self.header.iter().map(|&c| COLUMNS[c]).collect();
        let mut t = line(names.clone());
        for r in &self.rows {
            let cells = r.iter().enumerate().map(|(k, &(typed, i))| {
                let p = match (typed, names.get(k)) {
                    (true, Some(col)) => pool(col),
                    _ => CELLS,
                };
                p[i % p.len()]
            });
            t += &line(cells.collect());
        }
        let mut b = t.into_bytes();
        for m in &self.mutations {
            m.apply(&mut b);
        }
        b
    }
}

/// Lexically inside: relative, and no `..` above the start (independent of the reader's check).
fn inside(p: &str) -> bool {
    let mut depth = 0i64;
    Path::new(p).components().all(|c| {
        depth += match c {
            Component::Normal(_) => 1,
            Component::CurDir => 0,
            Component::ParentDir => -1,
            _ => return false,
        };
        depth >= 0
    })
}

fn check_loaded(
    r: Result<Manifest, AudioError>,
    text: &[u8],
    strict: bool,
) -> Result<bool, String> {
    let header = text.split(|&b| b == b'\n').next().unwrap_or_default();
    match r {
        Ok(m) => {
            if strict && m.entries.iter().any(|e| !inside(&e.path)) {
                return Err("a path outside the root was accepted by default".into());
            }
            if !String::from_utf8_lossy(header).contains("split") {
                return Err("a manifest without a split column was accepted".into());
            }
            for e in m.entries.iter().take(3) {
                // Decoding must agree with num_samples or say so, naming the utterance.
                if let Err(err) = m.load_entry_audio(e) {
                    if matches!(err, AudioError::NumSamplesMismatch { .. }) {
                        names_file(&err.to_string(), &e.id)?;
                    }
                }
            }
            Ok(true)
        }
        Err(e) => {
            let msg = e.to_string();
            names_file(&msg, "m.csv").or_else(|_| names_file(&msg, "partition.json"))
        }
    }
}

#[test]
fn fuzz_manifest_reader() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("spk")).unwrap();
    std::fs::write(root.join("spk/a.wav"), seeds::wav(1, 16_000, 1, 16, 4000)).unwrap();
    std::fs::write(
        dir.path().join("outside.wav"),
        seeds::wav(1, 8_000, 1, 16, 2000),
    )
    .unwrap();
    let m = dir.path().join("m.csv");
    let pj = dir.path().join("partition.json");
    fuzz("manifest", manifest_case(), |c| {
        let text = c.text();
        std::fs::write(&m, &text).unwrap();
        match PARTITION_JSON[c.partition_json] {
            "" => {
                let _ = std::fs::remove_file(&pj);
            }
            json => std::fs::write(&pj, json).unwrap(),
        }
        let opts = ManifestOptions {
            allow_outside_root: c.allow_outside_root,
        };
        let mut accepted = check_loaded(Manifest::load(&m), &text, true)?;
        accepted |= check_loaded(Manifest::load_with_root(&m, root.clone()), &text, true)?;
        let strict = !c.allow_outside_root;
        accepted |= check_loaded(
            Manifest::load_with(&m, Some(root.clone()), opts),
            &text,
            strict,
        )?;
        // The corpus reader of `prepare`: split optional, files checked to exist.
        for skip_bad in [false, true] {
            if let Ok(corpus) = scan_manifest_with(&m, Some(root.clone()), skip_bad, opts) {
                if !c.allow_outside_root && corpus.utterances.iter().any(|e| !inside(&e.path)) {
                    return Err("scan_manifest accepted a path outside the root".into());
                }
                accepted = true;
            }
        }
        Ok(accepted)
    });
}

#[derive(Debug, Clone)]
struct PartitionCase {
    /// (speaker, num_samples) per utterance.
    utterances: Vec<(u8, u64)>,
    method: u8,
    alpha: f64,
    num_clients: usize,
    seed: u64,
    valid_fraction: f64,
    min_client_utterances: usize,
    write: bool,
}

fn partition_case() -> impl Strategy<Value = PartitionCase> {
    let floats = |v: &'static [f64]| prop_oneof![3 => select(v), 1 => any::<f64>()];
    (
        vec((0u8..8, field_value()), 0..40),
        0u8..3,
        floats(&[
            0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            1e-300,
            1e-3,
            0.5,
            1.0,
            1e300,
        ]),
        prop_oneof![4 => 0usize..12, 1 => select(&[usize::MAX, 1 << 40, 1 << 20][..])],
        any::<u64>(),
        floats(&[0.0, 0.2, 0.5, 0.999, 1.0, -0.1, f64::NAN]),
        prop_oneof![4 => 0usize..6, 1 => Just(usize::MAX)],
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(utterances, method, alpha, num_clients, seed, vf, min, write)| PartitionCase {
                utterances,
                method,
                alpha,
                num_clients,
                seed,
                valid_fraction: vf,
                min_client_utterances: min,
                write,
            },
        )
}

fn corpus_of(root: &Path, c: &PartitionCase) -> Corpus {
    let utterances = c
        .utterances
        .iter()
        .enumerate()
        .map(|(i, &(spk, n))| Entry {
            id: format!("u{i:03}"),
            path: format!("s{spk}/u{i}.wav"),
            split: Split::Train,
            num_samples: n,
            sample_rate: 16_000,
            speaker: format!("s{spk}"),
            chapter: String::new(),
            transcript: String::new(),
        })
        .collect();
    Corpus {
        root: root.to_path_buf(),
        utterances,
        skipped: vec![],
    }
}

/// Every utterance lands on exactly one client, each client has a training utterance, and the
/// written partition reads back to the same entries.
fn check_partition(
    out: &Path,
    corpus: &Corpus,
    c: &PartitionCase,
    cfg: &PartitionConfig,
) -> Result<bool, String> {
    let Ok(clients) = partition(corpus, cfg) else {
        return Ok(false);
    };
    if clients.len() != c.num_clients {
        return Err(format!(
            "{} clients, asked for {}",
            clients.len(),
            c.num_clients
        ));
    }
    let mut ids: Vec<&str> = clients.iter().flatten().map(|e| e.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    if ids.len() != corpus.utterances.len() || clients.iter().flatten().count() != ids.len() {
        return Err("utterances lost or duplicated".into());
    }
    if clients
        .iter()
        .any(|k| !k.iter().any(|e| e.split == Split::Train))
    {
        return Err("a client without a training utterance".into());
    }
    if c.write {
        write_partition(out, corpus, &clients, cfg).map_err(|e| e.to_string())?;
        for (k, entries) in clients.iter().enumerate() {
            let m = Manifest::load(&out.join(format!("client_{k}/manifest.csv")))
                .map_err(|e| format!("written partition does not reload: {e}"))?;
            if &m.entries != entries {
                return Err(format!("client {k} reloads different entries"));
            }
        }
    }
    Ok(true)
}

#[test]
fn fuzz_partition() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("corpus");
    std::fs::create_dir_all(&root).unwrap();
    fuzz("partition", partition_case(), |c| {
        let method = match c.method {
            0 => Method::Speaker,
            1 => Method::Iid,
            _ => Method::Dirichlet { alpha: c.alpha },
        };
        let cfg = PartitionConfig {
            method,
            num_clients: c.num_clients,
            seed: c.seed,
            valid_fraction: c.valid_fraction,
            min_client_utterances: c.min_client_utterances,
        };
        check_partition(&dir.path().join("out"), &corpus_of(&root, c), c, &cfg)
    });
}

/// A shard pair: a valid one (seed, or built from frame counts) or a header written field by
/// field with its own `.len`; then byte mutations of either file.
#[derive(Debug, Clone)]
struct ShardCase {
    base: ShardBase,
    npy_mutations: Vec<Mutation>,
    len_mutations: Vec<Mutation>,
}

#[derive(Debug, Clone)]
enum ShardBase {
    Seed(usize),
    Built {
        labels: bool,
        dim: u8,
        lengths: Vec<u8>,
    },
    Header {
        version: u8,
        descr: usize,
        fortran: bool,
        shape: Vec<u64>,
        hlen_delta: i8,
        data: Vec<u8>,
        lengths: Vec<u64>,
    },
}

const DESCRS: &[&str] = &["<f4", "<u2", "<f8", "|u1", ""];

fn shard_base() -> impl Strategy<Value = ShardBase> {
    let header = (
        1u8..4,
        0..DESCRS.len(),
        prop::bool::weighted(0.1),
        vec(prop_oneof![3 => 0u64..6, 1 => field_value()], 0..4),
        prop_oneof![4 => Just(0i8), 1 => any::<i8>()],
        vec(any::<u8>(), 0..64),
        vec(prop_oneof![3 => 0u64..6, 1 => field_value()], 0..4),
    )
        .prop_map(
            |(version, descr, fortran, shape, hlen_delta, data, lengths)| ShardBase::Header {
                version,
                descr,
                fortran,
                shape,
                hlen_delta,
                data,
                lengths,
            },
        );
    prop_oneof![
        1 => (0usize..2).prop_map(ShardBase::Seed),
        2 => (any::<bool>(), 1u8..5, vec(0u8..6, 0..5))
            .prop_map(|(labels, dim, lengths)| ShardBase::Built { labels, dim, lengths }),
        1 => header,
    ]
}

fn shard_case() -> impl Strategy<Value = ShardCase> {
    let muts = || prop_oneof![2 => Just(vec![]), 1 => mutations()];
    (shard_base(), muts(), muts()).prop_map(|(base, npy_mutations, len_mutations)| ShardCase {
        base,
        npy_mutations,
        len_mutations,
    })
}

fn npy_bytes(version: u8, dict: &str, hlen_delta: i8, data: &[u8]) -> Vec<u8> {
    let hlen = (dict.len() as i64 + hlen_delta as i64).max(0) as u32;
    let mut b = b"\x93NUMPY".to_vec();
    b.extend([version, 0]);
    match version {
        1 => b.extend((hlen as u16).to_le_bytes()),
        _ => b.extend(hlen.to_le_bytes()),
    }
    b.extend(dict.as_bytes());
    b.extend(data);
    b
}

fn lines(v: impl Iterator<Item = u64>) -> Vec<u8> {
    v.map(|n| format!("{n}\n")).collect::<String>().into_bytes()
}

impl ShardCase {
    /// (`.npy`, `.len`) bytes.
    fn files(&self, seeds: &[(Vec<u8>, Vec<u8>)]) -> (Vec<u8>, Vec<u8>) {
        let (mut npy, mut len) = match &self.base {
            ShardBase::Seed(i) => seeds[*i].clone(),
            ShardBase::Built {
                labels,
                dim,
                lengths,
            } => {
                let rows: usize = lengths.iter().map(|&n| n as usize).sum();
                let (descr, shape, width) = match labels {
                    true => ("<u2", format!("({rows},)"), 2),
                    false => ("<f4", format!("({rows}, {dim})"), 4 * *dim as usize),
                };
                let dict =
                    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
                let data: Vec<u8> = (0..rows * width).map(|i| i as u8).collect();
                (
                    npy_bytes(1, &dict, 0, &data),
                    lines(lengths.iter().map(|&n| n as u64)),
                )
            }
            ShardBase::Header {
                version,
                descr,
                fortran,
                shape,
                hlen_delta,
                data,
                lengths,
            } => {
                let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
                let dict = format!(
                    "{{'descr': '{}', 'fortran_order': {}, 'shape': ({},), }}",
                    DESCRS[*descr],
                    if *fortran { "True" } else { "False" },
                    dims.join(", ")
                );
                (
                    npy_bytes(*version, &dict, *hlen_delta, data),
                    lines(lengths.iter().copied()),
                )
            }
        };
        for m in &self.npy_mutations {
            m.apply(&mut npy);
        }
        for m in &self.len_mutations {
            m.apply(&mut len);
        }
        (npy, len)
    }
}

fn check_shard<T: fedhubert_features::shard::NpyElem>(dir: &Path) -> Result<bool, String> {
    match ShardReader::<T>::open(dir, "x") {
        Ok(r) => {
            let (want, dim) = (r.lengths().iter().sum::<usize>(), r.dim());
            let all = r
                .read_all()
                .map_err(|e| format!("opened, then failed to read: {e}"))?;
            let got: usize = all.iter().map(Vec::len).sum();
            match got == want * dim {
                true => Ok(true),
                false => Err(format!("{got} values read, index says {want} x {dim}")),
            }
        }
        Err(e) => {
            let msg = e.to_string();
            names_file(&msg, "x.npy").or_else(|_| names_file(&msg, "x.len"))
        }
    }
}

#[test]
fn fuzz_shard_readers() {
    let seeds = seeds::shards();
    let dir = tempfile::tempdir().unwrap();
    fuzz("npy+len", shard_case(), |c| {
        let (npy, len) = c.files(&seeds);
        std::fs::write(dir.path().join("x.npy"), npy).unwrap();
        std::fs::write(dir.path().join("x.len"), len).unwrap();
        Ok(check_shard::<f32>(dir.path())? | check_shard::<u16>(dir.path())?)
    });
}

/// A safetensors header written field by field: tensors with extreme shapes and offsets.
#[derive(Debug, Clone)]
struct StHeader {
    tensors: Vec<(usize, usize, Vec<u64>, (u64, u64))>,
    order: Option<Vec<usize>>,
    len_delta: i8,
    body: Vec<u8>,
}

const ST_NAMES: &[&str] = &["g/a", "g/b", "h/a", "a", "g/"];
const ST_DTYPES: &[&str] = &["F32", "F16", "I64", "BOOL", "F64", "U8"];

fn st_header() -> impl Strategy<Value = StHeader> {
    let small = || prop_oneof![3 => 0u64..40, 1 => field_value()];
    (
        vec(
            (
                0..ST_NAMES.len(),
                0..ST_DTYPES.len(),
                vec(small(), 0..3),
                (small(), small()),
            ),
            0..4,
        ),
        prop::option::of(vec(0..ST_NAMES.len(), 0..5)),
        prop_oneof![4 => Just(0i8), 1 => any::<i8>()],
        vec(any::<u8>(), 0..96),
    )
        .prop_map(|(tensors, order, len_delta, body)| StHeader {
            tensors,
            order,
            len_delta,
            body,
        })
}

impl StHeader {
    fn bytes(&self) -> Vec<u8> {
        let mut fields = Vec::new();
        if let Some(o) = &self.order {
            let names: Vec<&str> = o.iter().map(|&i| ST_NAMES[i]).collect();
            fields.push(format!(
                "\"__metadata__\":{{\"order\":\"{}\"}}",
                names.join(",")
            ));
        }
        for (name, dtype, shape, (s, e)) in &self.tensors {
            let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
            fields.push(format!(
                "\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{s},{e}]}}",
                ST_NAMES[*name],
                ST_DTYPES[*dtype],
                dims.join(",")
            ));
        }
        let header = format!("{{{}}}", fields.join(","));
        let n = (header.len() as i64 + self.len_delta as i64).max(0) as u64;
        let mut b = n.to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(&self.body);
        b
    }
}

#[test]
fn fuzz_safetensors_reader() {
    let seeds = seeds::safetensors();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fuzz.safetensors");
    let case = prop_oneof![
        2 => input(seeds.len(), 1).prop_map(|i| (Some(i), None)),
        1 => st_header().prop_map(|h| (None, Some(h))),
    ];
    fuzz("safetensors", case, |(i, h)| {
        let bytes = match (i, h) {
            (Some(i), _) => i.bytes(&seeds, &[b"\x40\x00\x00\x00\x00\x00\x00\x00{"]),
            (None, Some(h)) => h.bytes(),
            (None, None) => unreachable!("one of the two"),
        };
        std::fs::write(&p, &bytes).unwrap();
        match fedhubert_io::load_safetensors(&p) {
            Ok((groups, _)) => {
                let floats: usize = groups.values().map(|w| w.num_params()).sum();
                match floats * 4 <= bytes.len() {
                    true => Ok(true),
                    false => Err(format!("{floats} floats from a {}-byte file", bytes.len())),
                }
            }
            Err(e) => names_file(&e.to_string(), "fuzz.safetensors"),
        }
    });
}
