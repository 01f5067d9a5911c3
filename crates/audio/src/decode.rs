//! FLAC (claxon) and WAV (hound) decoding to mono f32 at the model rate.
//!
//! Integer PCM is scaled by 2^(bits-1), the convention of torchaudio/soundfile, so features match
//! reference tools bit for bit on 16 kHz input. Other rates go through rubato's FFT resampler.

use std::io::{BufReader, Read};
use std::path::Path;

use rubato::{FftFixedIn, Resampler};

use crate::AudioError;

/// The rate every model in fedhubert consumes.
pub const MODEL_SAMPLE_RATE: u32 = 16_000;

/// Decoded audio: mono, `MODEL_SAMPLE_RATE`, in [-1, 1].
#[derive(Debug, Clone)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub orig_sample_rate: u32,
    pub orig_channels: u16,
}

/// Interleaved PCM as read from the file, before downmix and resampling.
struct Raw {
    interleaved: Vec<f32>,
    channels: u16,
    rate: u32,
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// True for the file types `load_audio` reads.
pub fn is_audio_file(path: &Path) -> bool {
    matches!(extension(path).as_deref(), Some("flac" | "wav"))
}

/// Most interleaved samples one file may decode to: 2^30 (4 GiB as f32; 18.6 h of 16 kHz mono,
/// 3.1 h of 48 kHz stereo). FLAC's constant subframes code 65,535 samples in a dozen bytes, so a
/// small file can legitimately expand a thousandfold; this cap keeps such a file an error instead
/// of an out-of-memory abort.
pub const MAX_FILE_SAMPLES: u64 = 1 << 30;

/// Sample rates `load_audio` accepts. Outside this range the rate is almost surely a corrupt
/// header, and resampling from it to 16 kHz would either multiply the length (1 Hz -> 16,000x;
/// here at most 4x) or ask the FFT resampler for a transform as long as the rate itself (a prime
/// near 2^32).
pub const SAMPLE_RATES: std::ops::RangeInclusive<u32> = 4_000..=384_000;

/// FLAC samples reserved per byte of file, at most. Speech at 16 bits compresses to about one
/// byte per sample; a header claiming more than 4 per byte is believed only as the samples arrive.
const FLAC_RESERVE_PER_BYTE: u64 = 4;

fn check_stream(path: &Path, rate: u32, channels: u32, bits: u32) -> Result<(), AudioError> {
    let why = if !SAMPLE_RATES.contains(&rate) {
        format!(
            "sample rate {rate} Hz outside the supported {}..={} Hz",
            SAMPLE_RATES.start(),
            SAMPLE_RATES.end()
        )
    } else if channels == 0 {
        "zero channels".to_string()
    } else if !(1..=32).contains(&bits) {
        format!("{bits} bits per sample (expected 1 to 32)")
    } else {
        return Ok(());
    };
    Err(AudioError::Decode {
        path: path.to_path_buf(),
        why,
    })
}

/// Scale of integer PCM with `bits` significant bits (checked to be 1..=32).
fn int_scale(bits: u32) -> f32 {
    1.0 / (1u64 << (bits - 1)) as f32
}

fn too_long(path: &Path) -> AudioError {
    AudioError::TooLong {
        path: path.to_path_buf(),
        max: MAX_FILE_SAMPLES,
    }
}

fn read_flac(path: &Path, input: impl Read, file_bytes: u64) -> Result<Raw, AudioError> {
    let dec = |why: String| AudioError::Decode {
        path: path.to_path_buf(),
        why,
    };
    let mut reader = claxon::FlacReader::new(input).map_err(|e| match e {
        claxon::Error::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => {
            AudioError::io(path, io)
        }
        other => dec(format!("not a valid FLAC stream ({other})")),
    })?;
    let info = reader.streaminfo();
    check_stream(path, info.sample_rate, info.channels, info.bits_per_sample)?;
    let scale = int_scale(info.bits_per_sample);
    let channels = info.channels as u64;
    // The header's total is believed only up to what the file's bytes plausibly hold: a STREAMINFO
    // claiming 2^36 samples must not reserve 256 GiB before a single frame is read.
    let declared = info
        .samples
        .filter(|&n| n > 0)
        .map(|n| n.saturating_mul(channels));
    let reserve = declared
        .unwrap_or(0)
        .min(file_bytes.saturating_mul(FLAC_RESERVE_PER_BYTE))
        .min(MAX_FILE_SAMPLES);
    let mut interleaved = Vec::with_capacity(reserve as usize);
    let limit = declared.unwrap_or(u64::MAX).min(MAX_FILE_SAMPLES);
    for s in reader.samples() {
        let s = s.map_err(|e| match e {
            claxon::Error::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => {
                AudioError::io(path, io)
            }
            other => dec(format!("corrupt or truncated FLAC data ({other})")),
        })?;
        if interleaved.len() as u64 >= limit {
            // More than declared is as wrong as fewer; stop before it costs memory.
            return Err(match declared {
                Some(d) if d <= MAX_FILE_SAMPLES => dec(format!(
                    "stream info declares {} samples, but the stream holds more",
                    d / channels
                )),
                _ => too_long(path),
            });
        }
        interleaved.push(s as f32 * scale);
    }
    if let Some(total) = info.samples.filter(|&n| n > 0) {
        let got = interleaved.len() as u64 / channels;
        if got != total {
            return Err(dec(format!(
                "truncated: stream info declares {total} samples, decoded {got}"
            )));
        }
    }
    Ok(Raw {
        interleaved,
        channels: info.channels as u16,
        rate: info.sample_rate,
    })
}

fn read_wav(path: &Path, input: impl Read, file_bytes: u64) -> Result<Raw, AudioError> {
    let dec = |why: String| AudioError::Decode {
        path: path.to_path_buf(),
        why,
    };
    let reader = hound::WavReader::new(input).map_err(|e| match e {
        hound::Error::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => {
            AudioError::io(path, io)
        }
        other => dec(format!("not a valid WAV file ({other})")),
    })?;
    let spec = reader.spec();
    check_stream(
        path,
        spec.sample_rate,
        spec.channels as u32,
        spec.bits_per_sample as u32,
    )?;
    // The data chunk must fit in the file: each sample takes at least ceil(bits / 8) bytes.
    let declared = reader.len() as u64;
    let data_bytes = declared * (spec.bits_per_sample as u64).div_ceil(8);
    if data_bytes > file_bytes {
        return Err(AudioError::HeaderExceedsFile {
            path: path.to_path_buf(),
            what: format!("WAV data chunk of {declared} samples"),
            declared: data_bytes,
            file_bytes,
        });
    }
    if declared > MAX_FILE_SAMPLES {
        return Err(too_long(path));
    }
    let mut interleaved = Vec::with_capacity(declared as usize);
    let corrupt = |e: hound::Error| dec(format!("corrupt or truncated WAV data ({e})"));
    match spec.sample_format {
        hound::SampleFormat::Float => {
            for s in reader.into_samples::<f32>() {
                let v = s.map_err(corrupt)?;
                // A NaN or infinity made the FFT resampler panic, and would poison every
                // feature of the utterance anyway.
                if !v.is_finite() {
                    return Err(dec(format!(
                        "non-finite sample {v} at index {}",
                        interleaved.len()
                    )));
                }
                interleaved.push(v);
            }
        }
        hound::SampleFormat::Int => {
            let scale = int_scale(spec.bits_per_sample as u32);
            for s in reader.into_samples::<i32>() {
                interleaved.push(s.map_err(corrupt)? as f32 * scale);
            }
        }
    }
    if interleaved.len() as u64 != declared {
        return Err(dec(format!(
            "truncated: header declares {declared} samples, read {}",
            interleaved.len()
        )));
    }
    Ok(Raw {
        interleaved,
        channels: spec.channels,
        rate: spec.sample_rate,
    })
}

/// Mono samples, rate and original channel count. Mono input is moved, not copied: at the
/// length cap a copy would be another 4 GiB.
fn downmix(raw: Raw) -> (Vec<f32>, u32, u16) {
    let c = raw.channels as usize;
    let mono = if c == 1 {
        raw.interleaved
    } else {
        raw.interleaved
            .chunks_exact(c)
            .map(|fr| fr.iter().sum::<f32>() / c as f32)
            .collect()
    };
    (mono, raw.rate, raw.channels)
}

/// Number of samples `resample` produces for `n` input samples.
pub fn resampled_len(n: usize, from: u32, to: u32) -> usize {
    ((n as u64 * to as u64).div_ceil(from as u64)) as usize
}

/// Band-limited resampling (rubato's synchronous FFT resampler), delay-compensated so that output
/// sample i lines up with input time i/to.
pub fn resample(x: &[f32], from: u32, to: u32) -> Result<Vec<f32>, String> {
    if from == to {
        return Ok(x.to_vec());
    }
    let want = resampled_len(x.len(), from, to);
    let mut rs = FftFixedIn::<f64>::new(from as usize, to as usize, 1024, 2, 1)
        .map_err(|e| e.to_string())?;
    let delay = rs.output_delay();
    let mut out: Vec<f64> = Vec::with_capacity(want + delay + 2048);
    let input: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut pos = 0;
    while input.len() - pos >= rs.input_frames_next() {
        let n = rs.input_frames_next();
        let o = rs
            .process(&[&input[pos..pos + n]], None)
            .map_err(|e| e.to_string())?;
        out.extend_from_slice(&o[0]);
        pos += n;
    }
    if pos < input.len() {
        let o = rs
            .process_partial(Some(&[&input[pos..]]), None)
            .map_err(|e| e.to_string())?;
        out.extend_from_slice(&o[0]);
    }
    while out.len() < want + delay {
        let o = rs
            .process_partial::<&[f64]>(None, None)
            .map_err(|e| e.to_string())?;
        if o[0].is_empty() {
            break;
        }
        out.extend_from_slice(&o[0]);
    }
    let mut y: Vec<f32> = out
        .iter()
        .skip(delay)
        .take(want)
        .map(|&v| v as f32)
        .collect();
    y.resize(want, 0.0);
    Ok(y)
}

/// Decodes a FLAC or WAV file to mono 16 kHz f32. Errors name the file and the cause
/// (not audio, corrupt, truncated, zero-length, a header claiming more than the file holds).
pub fn load_audio(path: &Path) -> Result<Audio, AudioError> {
    let kind = kind_of(path)?;
    let file = std::fs::File::open(path).map_err(|e| AudioError::io(path, e))?;
    let file_bytes = file.metadata().map_err(|e| AudioError::io(path, e))?.len();
    decode(path, kind, BufReader::new(file), file_bytes)
}

/// Decodes the bytes of a FLAC or WAV file, chosen by `path`'s extension; `path` only names the
/// source in errors. The same checks as [`load_audio`], without touching the disk.
pub fn decode_audio_bytes(path: &Path, bytes: &[u8]) -> Result<Audio, AudioError> {
    decode(path, kind_of(path)?, bytes, bytes.len() as u64)
}

#[derive(Clone, Copy)]
enum Kind {
    Flac,
    Wav,
}

fn kind_of(path: &Path) -> Result<Kind, AudioError> {
    match extension(path).as_deref() {
        Some("flac") => Ok(Kind::Flac),
        Some("wav") => Ok(Kind::Wav),
        _ => Err(AudioError::Unsupported {
            path: path.to_path_buf(),
        }),
    }
}

fn decode(path: &Path, kind: Kind, input: impl Read, file_bytes: u64) -> Result<Audio, AudioError> {
    let raw = match kind {
        Kind::Flac => read_flac(path, input, file_bytes)?,
        Kind::Wav => read_wav(path, input, file_bytes)?,
    };
    let mono = downmix(raw);
    if mono.0.is_empty() {
        return Err(AudioError::Empty {
            path: path.to_path_buf(),
        });
    }
    let samples =
        resample(&mono.0, mono.1, MODEL_SAMPLE_RATE).map_err(|why| AudioError::Resample {
            path: path.to_path_buf(),
            from: mono.1,
            why,
        })?;
    Ok(Audio {
        samples,
        orig_sample_rate: mono.1,
        orig_channels: mono.2,
    })
}
