//! Headers are untrusted: a size field that claims more than the file holds is an error, never an
//! allocation sized from it (a STREAMINFO claiming 2^36 samples once aborted the process).

use std::path::{Path, PathBuf};

use fedhubert_audio::{AudioError, decode_audio_bytes, load_audio};

fn real_flac() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/librispeech-sample/test-clean/1089/134686/1089-134686-0001.flac");
    std::fs::read(p).unwrap()
}

/// Byte offset of STREAMINFO's 64-bit field (rate:20, channels-1:3, bits-1:5, total samples:36).
const SI_PACKED: usize = 8 + 10;

fn set_total_samples(flac: &mut [u8], total: u64) {
    let f = &mut flac[SI_PACKED..SI_PACKED + 8];
    let mut v = u64::from_be_bytes(f.try_into().unwrap());
    v = (v & !((1u64 << 36) - 1)) | (total & ((1u64 << 36) - 1));
    f.copy_from_slice(&v.to_be_bytes());
}

fn set_sample_rate(flac: &mut [u8], rate: u32) {
    let f = &mut flac[SI_PACKED..SI_PACKED + 8];
    let mut v = u64::from_be_bytes(f.try_into().unwrap());
    v = (v & ((1u64 << 44) - 1)) | ((rate as u64) << 44);
    f.copy_from_slice(&v.to_be_bytes());
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

/// A valid 16 kHz mono 16-bit FLAC of `frames` constant 4096-sample blocks: 11 bytes per block,
/// so it decodes to ~370 samples per file byte, far beyond what its size suggests.
fn constant_flac(frames: u8, total_samples: u64) -> Vec<u8> {
    let mut out = b"fLaC".to_vec();
    out.extend([0x80, 0, 0, 34]); // last metadata block, STREAMINFO, 34 bytes
    out.extend(4096u16.to_be_bytes());
    out.extend(4096u16.to_be_bytes());
    out.extend([0u8; 6]); // frame sizes unknown
    let packed: u64 = (16_000u64 << 44) | (15 << 36) | (total_samples & ((1 << 36) - 1));
    out.extend(packed.to_be_bytes());
    out.extend([0u8; 16]); // MD5 unknown
    for k in 0..frames {
        assert!(k < 128, "one-byte frame numbers only");
        // Sync + fixed blocksize; 4096 samples, 16 kHz; mono, 16 bits; frame number k.
        let mut frame = vec![0xFF, 0xF8, 0xC5, 0x08, k];
        frame.push(crc8(&frame));
        frame.push(0x00); // constant subframe, no wasted bits
        frame.extend((1000i16 * (k as i16 + 1)).to_be_bytes());
        let crc = crc16(&frame);
        frame.extend(crc.to_be_bytes());
        out.extend(frame);
    }
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn flac_claiming_2_pow_36_samples_is_an_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let mut flac = real_flac();
    set_total_samples(&mut flac, (1 << 36) - 1);
    let p = write(dir.path(), "huge.flac", &flac);
    let e = load_audio(&p).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, AudioError::Decode { .. }), "{msg}");
    assert!(
        msg.contains("huge.flac") && msg.contains(&((1u64 << 36) - 1).to_string()),
        "{msg}"
    );
    let e = decode_audio_bytes(Path::new("mem.flac"), &flac).unwrap_err();
    assert!(e.to_string().contains("mem.flac"), "{e}");
}

#[test]
fn flac_holding_more_than_declared_stops_early_and_unknown_total_decodes() {
    let real = real_flac();
    let want = decode_audio_bytes(Path::new("a.flac"), &real).unwrap();
    let mut short = real.clone();
    set_total_samples(&mut short, 1000);
    let e = decode_audio_bytes(Path::new("a.flac"), &short).unwrap_err();
    assert!(e.to_string().contains("holds more"), "{e}");
    // Total 0 means "unknown" in FLAC: the stream itself decides, and decodes the same samples.
    let mut unknown = real;
    set_total_samples(&mut unknown, 0);
    let got = decode_audio_bytes(Path::new("a.flac"), &unknown).unwrap();
    assert_eq!(got.samples, want.samples);
}

#[test]
fn flac_longer_than_its_reservation_still_decodes_exactly() {
    // 20 blocks x 4096 = 81,920 samples from a ~260-byte file: the reservation (4 per byte) is
    // ~1,000 samples, so the buffer must grow while decoding, and the result must be exact.
    let flac = constant_flac(20, 20 * 4096);
    assert!(flac.len() < 300, "{}", flac.len());
    let a = decode_audio_bytes(Path::new("c.flac"), &flac).unwrap();
    assert_eq!(a.samples.len(), 20 * 4096);
    for (k, block) in a.samples.chunks(4096).enumerate() {
        let v = 1000.0 * (k as f32 + 1.0) / 32768.0;
        assert!(block.iter().all(|&s| s == v), "block {k}");
    }
    // The same stream with an unknown total, and with a total claiming more than it holds.
    assert_eq!(
        decode_audio_bytes(Path::new("c.flac"), &constant_flac(20, 0))
            .unwrap()
            .samples,
        a.samples
    );
    let e = decode_audio_bytes(Path::new("c.flac"), &constant_flac(20, 21 * 4096)).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn flac_sample_rate_outside_the_supported_range_is_refused() {
    for rate in [1, 999, 655_350] {
        let mut flac = real_flac();
        set_sample_rate(&mut flac, rate);
        let e = decode_audio_bytes(Path::new("r.flac"), &flac).unwrap_err();
        assert!(
            matches!(e, AudioError::Decode { .. }) && e.to_string().contains(&format!("{rate} Hz")),
            "{rate}: {e}"
        );
    }
}

/// A canonical 44-byte 16-bit PCM WAV header followed by `data`.
fn wav(rate: u32, channels: u16, data_len: u32, data: &[u8]) -> Vec<u8> {
    let mut w = b"RIFF".to_vec();
    w.extend((36 + data.len() as u32).to_le_bytes());
    w.extend(b"WAVEfmt ");
    w.extend(16u32.to_le_bytes());
    w.extend(1u16.to_le_bytes());
    w.extend(channels.to_le_bytes());
    w.extend(rate.to_le_bytes());
    w.extend((rate * 2 * channels as u32).to_le_bytes());
    w.extend((2 * channels).to_le_bytes());
    w.extend(16u16.to_le_bytes());
    w.extend(b"data");
    w.extend(data_len.to_le_bytes());
    w.extend(data);
    w
}

#[test]
fn wav_data_chunk_larger_than_the_file_names_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = wav(16_000, 1, 0xFFFF_FFFE, &[0u8; 64]);
    let p = write(dir.path(), "liar.wav", &bytes);
    let e = load_audio(&p).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            AudioError::HeaderExceedsFile {
                declared: 0xFFFF_FFFE,
                file_bytes: 108,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("liar.wav") && msg.contains("4294967294"),
        "{msg}"
    );
    // The same header with the true length decodes.
    let ok = wav(16_000, 1, 64, &[0u8; 64]);
    assert_eq!(
        decode_audio_bytes(Path::new("ok.wav"), &ok)
            .unwrap()
            .samples
            .len(),
        32
    );
}

#[test]
fn wav_absurd_sample_rates_are_refused_before_resampling() {
    // 4,294,967,291 Hz is prime: resampling it to 16 kHz would ask for a 2^32-point FFT.
    for rate in [1u32, 3_999, 4_294_967_291] {
        let mut bytes = wav(16_000, 1, 64, &[0u8; 64]);
        bytes[24..28].copy_from_slice(&rate.to_le_bytes());
        // Keep the redundant byte rate consistent, so hound accepts the header and ours refuses.
        bytes[28..32].copy_from_slice(&rate.wrapping_mul(2).to_le_bytes());
        let e = decode_audio_bytes(Path::new("r.wav"), &bytes).unwrap_err();
        assert!(
            matches!(e, AudioError::Decode { .. }) && e.to_string().contains("r.wav"),
            "{rate}: {e}"
        );
        if rate < 4_000 {
            // hound accepts these headers; the range check is what refuses them.
            assert!(e.to_string().contains(&format!("{rate} Hz")), "{e}");
        }
    }
}

/// Found by `fedhubert-fuzz` (target wav): a float WAV whose first sample is NaN made the FFT
/// resampler panic ("Imaginary part of first value was non-zero") at 44.1 kHz.
#[test]
fn float_wav_with_a_nan_sample_is_an_error_not_a_panic() {
    let mut w = b"RIFF".to_vec();
    w.extend((36u32 + 8).to_le_bytes());
    w.extend(b"WAVEfmt ");
    w.extend(16u32.to_le_bytes());
    w.extend(3u16.to_le_bytes()); // IEEE float
    w.extend(1u16.to_le_bytes());
    w.extend(44_100u32.to_le_bytes());
    w.extend((44_100u32 * 4).to_le_bytes());
    w.extend(4u16.to_le_bytes());
    w.extend(32u16.to_le_bytes());
    w.extend(b"data");
    w.extend(8u32.to_le_bytes());
    w.extend(f32::from_bits(0x7FFF_FFFF).to_le_bytes());
    w.extend(0.25f32.to_le_bytes());
    let e = decode_audio_bytes(Path::new("nan.wav"), &w).unwrap_err();
    assert!(
        matches!(e, AudioError::Decode { .. }) && e.to_string().contains("non-finite"),
        "{e}"
    );
    let inf = [&w[..44], &f32::INFINITY.to_le_bytes()[..], &w[48..]].concat();
    assert!(decode_audio_bytes(Path::new("inf.wav"), &inf).is_err());
}

#[test]
fn a_symlink_loop_is_walked_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("corpus");
    std::fs::create_dir_all(a.join("spk")).unwrap();
    std::fs::write(a.join("spk/1-2-0001.flac"), real_flac()).unwrap();
    // corpus/spk/loop -> corpus: followed, it nests without end.
    std::os::unix::fs::symlink(&a, a.join("spk/loop")).unwrap();
    let c = fedhubert_audio::scan::scan_dir(&a, false).unwrap();
    assert_eq!(c.utterances.len(), 1, "{:?}", c.utterances);
}
