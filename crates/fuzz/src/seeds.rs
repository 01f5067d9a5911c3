//! Seed files for the mutators: small valid files of every format, smallest first (shrinking
//! moves toward seed 0). Real bundled audio plus synthesized files that reach code paths the
//! bundled ones do not (stereo, 8/24/32-bit and float WAV, other rates, constant FLAC blocks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedhubert_features::shard::{ShardWriter, shard_paths};
use fedhubert_io::{Tensor, Weights, order_metadata, save_safetensors};

/// The repository's `assets/` folder.
pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

fn read(rel: &str) -> Vec<u8> {
    let p = assets().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("seed {}: {e}", p.display()))
}

fn crc8(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |mut c, &b| {
        c ^= b;
        for _ in 0..8 {
            c = if c & 0x80 != 0 {
                (c << 1) ^ 0x07
            } else {
                c << 1
            };
        }
        c
    })
}

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |mut c, &b| {
        c ^= (b as u16) << 8;
        for _ in 0..8 {
            c = if c & 0x8000 != 0 {
                (c << 1) ^ 0x8005
            } else {
                c << 1
            };
        }
        c
    })
}

/// A valid 16 kHz 16-bit FLAC of `frames` blocks of 4096 samples, each channel one constant
/// subframe (11 bytes a block for mono): tiny files with correct CRCs, so mutations of their
/// headers reach the decoder instead of dying at the first checksum.
pub fn constant_flac(channels: u8, frames: u8) -> Vec<u8> {
    assert!((1..=2).contains(&channels) && frames < 128);
    let mut out = b"fLaC".to_vec();
    out.extend([0x80, 0, 0, 34]); // last metadata block: STREAMINFO, 34 bytes
    out.extend(4096u16.to_be_bytes());
    out.extend(4096u16.to_be_bytes());
    out.extend([0u8; 6]);
    let total = frames as u64 * 4096;
    let packed = (16_000u64 << 44) | (((channels - 1) as u64) << 41) | (15 << 36) | total;
    out.extend(packed.to_be_bytes());
    out.extend([0u8; 16]);
    for k in 0..frames {
        // Fixed blocksize; 4096 samples, 16 kHz; independent channels, 16 bits; frame k.
        let mut frame = vec![0xFF, 0xF8, 0xC5, ((channels - 1) << 4) | 0x08, k];
        frame.push(crc8(&frame));
        for c in 0..channels {
            frame.push(0x00);
            frame.extend((1000i16 * (k as i16 + 1) - 700 * c as i16).to_be_bytes());
        }
        let crc = crc16(&frame);
        frame.extend(crc.to_be_bytes());
        out.extend(frame);
    }
    out
}

/// FLAC seeds: two synthesized, then the two smallest bundled LibriSpeech files.
pub fn flac() -> Vec<Vec<u8>> {
    vec![
        constant_flac(1, 3),
        constant_flac(2, 2),
        read("librispeech-sample/train-clean-100/1447/130550/1447-130550-0000.flac"),
        read("librispeech-sample/train-clean-100/403/126855/403-126855-0000.flac"),
    ]
}

/// A WAV with a plain `fmt ` chunk (`format` 1 = PCM, 3 = float) and `frames` of a ramp.
pub fn wav(format: u16, rate: u32, channels: u16, bits: u16, frames: usize) -> Vec<u8> {
    let block = channels * bits.div_ceil(8);
    let mut data = Vec::new();
    for i in 0..frames * channels as usize {
        let x = (i as f32 * 0.37).sin() * 0.5;
        match (format, bits) {
            (3, _) => data.extend(x.to_le_bytes()),
            (_, 8) => data.push((x * 127.0 + 128.0) as u8),
            (_, b) => {
                data.extend(&((x * 2f32.powi(b as i32 - 1)) as i32).to_le_bytes()[..b as usize / 8])
            }
        }
    }
    let mut w = b"RIFF".to_vec();
    w.extend((36 + data.len() as u32).to_le_bytes());
    w.extend(b"WAVEfmt ");
    w.extend(16u32.to_le_bytes());
    w.extend(format.to_le_bytes());
    w.extend(channels.to_le_bytes());
    w.extend(rate.to_le_bytes());
    w.extend((rate * block as u32).to_le_bytes());
    w.extend(block.to_le_bytes());
    w.extend(bits.to_le_bytes());
    w.extend(b"data");
    w.extend((data.len() as u32).to_le_bytes());
    w.extend(data);
    w
}

/// WAV seeds: synthesized formats, then the smallest bundled speech-commands clip.
pub fn wav_files() -> Vec<Vec<u8>> {
    vec![
        wav(1, 16_000, 1, 16, 40),
        wav(1, 8_000, 2, 8, 40),
        wav(1, 22_050, 1, 24, 40),
        wav(1, 16_000, 2, 32, 30),
        wav(3, 44_100, 1, 32, 60),
        read("speech-commands-sample/down/8d4cdc60_nohash_1.wav"),
    ]
}

/// Valid shards as (`.npy` bytes, `.len` text): 3-dim f32 features and u16 labels.
pub fn shards() -> Vec<(Vec<u8>, Vec<u8>)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let read_pair = |stem: &str| {
        let (npy, len) = shard_paths(dir.path(), stem);
        (std::fs::read(npy).unwrap(), std::fs::read(len).unwrap())
    };
    let mut f = ShardWriter::<f32>::create(dir.path(), "f", Some(3)).unwrap();
    f.push(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    f.push(&[]).unwrap();
    f.push(&[7.0, 8.0, 9.0]).unwrap();
    f.finish().unwrap();
    let mut l = ShardWriter::<u16>::create(dir.path(), "l", None).unwrap();
    l.push(&[3, 1, 4, 1]).unwrap();
    l.push(&[5, 9]).unwrap();
    l.finish().unwrap();
    vec![read_pair("f"), read_pair("l")]
}

fn tensor(name: &str, shape: Vec<usize>) -> Tensor {
    let n = shape.iter().product::<usize>();
    Tensor {
        name: name.into(),
        shape,
        data: (0..n).map(|i| i as f32 * 0.5 - 1.0).collect(),
    }
}

/// safetensors seeds: a checkpoint-like file with `order` metadata over two groups, and a plain
/// one without metadata.
pub fn safetensors() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path().join("s.safetensors");
    let a = Weights::new(vec![tensor("w", vec![2, 3]), tensor("b", vec![3])]);
    let b = Weights::new(vec![tensor("m", vec![4])]);
    let groups = [("global/", &a), ("opt/", &b)];
    let mut meta = BTreeMap::new();
    meta.insert("order".to_string(), order_metadata(&groups));
    meta.insert("format".to_string(), "fedhubert-checkpoint".to_string());
    save_safetensors(&p, &groups, meta).unwrap();
    let with_order = std::fs::read(&p).unwrap();
    save_safetensors(&p, &[("x/", &b)], BTreeMap::new()).unwrap();
    let plain = std::fs::read(&p).unwrap();
    vec![plain, with_order]
}
