//! Precomputed MVQ codebook indexes (`fedhubert mvq encode`): `DIR/STEM.u8` (B bytes per 50 Hz
//! teacher frame, utterances back to back in manifest order) and `DIR/STEM.len` (frames per
//! utterance). With them an MVQ-KD client trains its student without running the teacher at all,
//! which is the point of MVQ-KD: the teacher's work is done once, where the audio lives.

use std::collections::HashMap;
use std::path::Path;

use fedhubert_audio::Manifest;
use fedhubert_io::provenance::Provenance;

use crate::{DistillError, Result};

/// The files of a code shard `STEM.*`, each with whether its provenance stamp hashes it.
pub const CODE_FILES: [(&str, bool); 2] = [("len", true), ("u8", false)];

/// The codes of one client folder, by utterance id.
#[derive(Debug, Clone)]
pub struct CodeTable {
    pub num_codebooks: usize,
    by_id: HashMap<String, Vec<u8>>,
}

impl CodeTable {
    /// Reads `DIR/STEM.u8` + `DIR/STEM.len` against `DIR/manifest.csv`; every mismatch (line
    /// count, byte count) is an error naming the file.
    pub fn load(dir: &Path, stem: &str, num_codebooks: usize) -> Result<Self> {
        let bad = |p: &Path, why: String| DistillError::Data(format!("{}: {why}", p.display()));
        let mpath = dir.join("manifest.csv");
        let manifest = Manifest::load(&mpath)?;
        let (bin, len) = (
            dir.join(format!("{stem}.u8")),
            dir.join(format!("{stem}.len")),
        );
        let bytes = std::fs::read(&bin).map_err(|e| {
            bad(
                &bin,
                format!("{e} (make it with `fedhubert mvq encode --stem {stem}`)"),
            )
        })?;
        let lens = std::fs::read_to_string(&len).map_err(|e| bad(&len, e.to_string()))?;
        let lens: Vec<usize> = lens
            .lines()
            .enumerate()
            .map(|(i, l)| {
                l.trim()
                    .parse()
                    .map_err(|_| bad(&len, format!("line {}: {l:?} is not a frame count", i + 1)))
            })
            .collect::<Result<_>>()?;
        if lens.len() != manifest.entries.len() {
            return Err(bad(
                &len,
                format!(
                    "{} utterances, but {} lists {}: re-run `fedhubert mvq encode`",
                    lens.len(),
                    mpath.display(),
                    manifest.entries.len()
                ),
            ));
        }
        // Codes of an edited manifest (or re-prepared folder) are another utterance's codes.
        let remake = format!("fedhubert mvq encode --stem {stem}");
        Provenance::read_for_shard(dir, stem, &remake)?.check(dir, &[("manifest", &mpath)])?;
        let total: usize = lens.iter().sum();
        if total * num_codebooks != bytes.len() {
            return Err(bad(
                &bin,
                format!(
                    "{} bytes, but {total} frames x {num_codebooks} codebooks need {}: encoded with another quantizer?",
                    bytes.len(),
                    total * num_codebooks
                ),
            ));
        }
        let mut by_id = HashMap::with_capacity(lens.len());
        let mut at = 0;
        for (e, n) in manifest.entries.iter().zip(&lens) {
            let end = at + n * num_codebooks;
            by_id.insert(e.id.clone(), bytes[at..end].to_vec());
            at = end;
        }
        Ok(Self {
            num_codebooks,
            by_id,
        })
    }

    /// The codes of utterance `id`, whose audio gives `want` teacher frames: exactly one frame of
    /// codes per frame, else the codes are stale.
    pub fn get(&self, id: &str, want: usize) -> Result<&[u8]> {
        let c = self.by_id.get(id).ok_or_else(|| {
            DistillError::Data(format!(
                "utterance {id}: no MVQ codes (re-run `fedhubert mvq encode`)"
            ))
        })?;
        let have = c.len() / self.num_codebooks;
        if have != want {
            return Err(DistillError::Data(format!(
                "utterance {id}: {have} frames of MVQ codes for {want} frames of audio (re-run `fedhubert mvq encode`)"
            )));
        }
        Ok(c)
    }
}

/// `t` frames of `codes` (B bytes per frame) for a crop starting at sample `start`: frame
/// `round(start / stride)`, as labels are aligned to crops, moved back when the crop's last frame
/// would run past the codes (at most one frame, from the rounding).
pub fn crop_codes(
    codes: &[u8],
    num_codebooks: usize,
    stride: usize,
    start: usize,
    t: usize,
) -> Result<&[u8]> {
    let n = codes.len() / num_codebooks;
    if t > n {
        return Err(DistillError::Data(format!(
            "crop of {t} frames from an utterance of {n} frames of codes"
        )));
    }
    let f0 = ((start as f64 / stride as f64).round() as usize).min(n - t);
    Ok(&codes[f0 * num_codebooks..(f0 + t) * num_codebooks])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_stay_inside_and_follow_the_start() {
        let b = 2;
        let codes: Vec<u8> = (0..20u8).flat_map(|f| [f, f]).collect();
        assert_eq!(crop_codes(&codes, b, 320, 0, 5).unwrap()[0], 0);
        assert_eq!(crop_codes(&codes, b, 320, 640, 5).unwrap()[0], 2);
        assert_eq!(crop_codes(&codes, b, 320, 800, 5).unwrap()[0], 3); // 2.5 rounds up
        // A crop whose rounded start would overrun is pulled back to the last full window.
        let c = crop_codes(&codes, b, 320, 320 * 16, 5).unwrap();
        assert_eq!((c[0], c[c.len() - 1]), (15, 19));
        assert!(crop_codes(&codes, b, 320, 0, 21).is_err());
    }
}
