//! FLAC (claxon) and WAV (hound) decoding to mono f32 at the model rate.
//!
//! Integer PCM is scaled by 2^(bits-1), the convention of torchaudio/soundfile, so features match
//! reference tools bit for bit on 16 kHz input. Other rates go through rubato's FFT resampler.

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

fn read_flac(path: &Path) -> Result<Raw, AudioError> {
    let dec = |why: String| AudioError::Decode {
        path: path.to_path_buf(),
        why,
    };
    let mut reader = claxon::FlacReader::open(path).map_err(|e| match e {
        claxon::Error::IoError(io) => AudioError::io(path, io),
        other => dec(format!("not a valid FLAC stream ({other})")),
    })?;
    let info = reader.streaminfo();
    if info.sample_rate == 0 || info.channels == 0 {
        return Err(dec(
            "FLAC stream info has zero sample rate or channels".into()
        ));
    }
    let scale = 1.0 / (1u64 << (info.bits_per_sample - 1)) as f32;
    let mut interleaved =
        Vec::with_capacity(info.samples.unwrap_or(0) as usize * info.channels as usize);
    for s in reader.samples() {
        let s = s.map_err(|e| dec(format!("corrupt or truncated FLAC data ({e})")))?;
        interleaved.push(s as f32 * scale);
    }
    if let Some(total) = info.samples {
        let got = interleaved.len() as u64 / info.channels as u64;
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

fn read_wav(path: &Path) -> Result<Raw, AudioError> {
    let dec = |why: String| AudioError::Decode {
        path: path.to_path_buf(),
        why,
    };
    let reader = hound::WavReader::open(path).map_err(|e| match e {
        hound::Error::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => {
            AudioError::io(path, io)
        }
        other => dec(format!("not a valid WAV file ({other})")),
    })?;
    let spec = reader.spec();
    if spec.sample_rate == 0 || spec.channels == 0 {
        return Err(dec("WAV header has zero sample rate or channels".into()));
    }
    let declared = reader.len() as usize;
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(|e| dec(format!("corrupt or truncated WAV data ({e})")))?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(|e| dec(format!("corrupt or truncated WAV data ({e})")))?
        }
    };
    if interleaved.len() != declared {
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

fn downmix(raw: &Raw) -> Vec<f32> {
    let c = raw.channels as usize;
    if c == 1 {
        return raw.interleaved.clone();
    }
    raw.interleaved
        .chunks_exact(c)
        .map(|fr| fr.iter().sum::<f32>() / c as f32)
        .collect()
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
/// (not audio, corrupt, truncated, zero-length).
pub fn load_audio(path: &Path) -> Result<Audio, AudioError> {
    let raw = match extension(path).as_deref() {
        Some("flac") => read_flac(path)?,
        Some("wav") => read_wav(path)?,
        _ => {
            return Err(AudioError::Unsupported {
                path: path.to_path_buf(),
            });
        }
    };
    if raw.interleaved.is_empty() {
        return Err(AudioError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mono = downmix(&raw);
    let samples =
        resample(&mono, raw.rate, MODEL_SAMPLE_RATE).map_err(|why| AudioError::Resample {
            path: path.to_path_buf(),
            from: raw.rate,
            why,
        })?;
    Ok(Audio {
        samples,
        orig_sample_rate: raw.rate,
        orig_channels: raw.channels,
    })
}
