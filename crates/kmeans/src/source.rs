//! Where frames come from. k-means only ever needs (a) a random batch of rows and (b) one ordered
//! pass over all rows, so a [`FrameSource`] offers exactly that and memory stays bounded by a batch.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fedhubert_features::shard::{ShardReader, shard_paths};

use crate::{KmError, Result};

pub trait FrameSource: Send + Sync {
    /// Values per frame.
    fn dim(&self) -> usize;
    /// Number of frames.
    fn n_frames(&self) -> usize;
    /// Copies rows `idx` (any order, repeats allowed) into `out` (cleared), in the order of `idx`.
    fn gather(&self, idx: &[usize], out: &mut Vec<f32>) -> Result<()>;
    /// Visits every frame in order, a chunk of whole rows at a time: `f(first_row, rows)`.
    fn for_each_chunk(&self, f: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()>;
}

/// Frames held in memory (row-major).
pub struct InMemorySource {
    dim: usize,
    data: Vec<f32>,
}

impl InMemorySource {
    pub fn new(data: Vec<f32>, dim: usize) -> Result<Self> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(KmError::Invalid(format!(
                "{} values are not whole {dim}-dim frames",
                data.len()
            )));
        }
        Ok(Self { dim, data })
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    /// Loads a 2-D float32 `.npy` file whole.
    pub fn from_npy(path: &Path) -> Result<Self> {
        let (dim, rows, offset) = npy_layout(path)?;
        let mut f = File::open(path).map_err(|e| KmError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(|e| KmError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let body = bytes
            .get(offset as usize..offset as usize + rows * dim * 4)
            .ok_or_else(|| {
                KmError::Invalid(format!(
                    "{}: file shorter than its {rows} x {dim} header says",
                    path.display()
                ))
            })?;
        let data = body
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Self::new(data, dim)
    }
}

impl FrameSource for InMemorySource {
    fn dim(&self) -> usize {
        self.dim
    }
    fn n_frames(&self) -> usize {
        self.data.len() / self.dim
    }
    fn gather(&self, idx: &[usize], out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.reserve(idx.len() * self.dim);
        for &i in idx {
            out.extend_from_slice(&self.data[i * self.dim..(i + 1) * self.dim]);
        }
        Ok(())
    }
    fn for_each_chunk(&self, f: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        let rows = 65536;
        for (c, chunk) in self.data.chunks(rows * self.dim).enumerate() {
            f(c * rows, chunk)?;
        }
        Ok(())
    }
}

/// Reads (dim, rows, data offset) of a 2-D little-endian float32 C-order `.npy`.
fn npy_layout(path: &Path) -> Result<(usize, usize, u64)> {
    let bad = |why: &str| KmError::Invalid(format!("{}: {why}", path.display()));
    let mut f = File::open(path).map_err(|e| KmError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut magic = [0u8; 12];
    f.read_exact(&mut magic[..10]).map_err(|e| KmError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err(bad("not an .npy file"));
    }
    let (hlen, pre) = match magic[6] {
        1 => (u16::from_le_bytes([magic[8], magic[9]]) as usize, 10),
        2 | 3 => {
            f.read_exact(&mut magic[10..12]).map_err(|e| KmError::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
            (
                u32::from_le_bytes([magic[8], magic[9], magic[10], magic[11]]) as usize,
                12,
            )
        }
        _ => return Err(bad("unsupported .npy version")),
    };
    let mut h = vec![0u8; hlen];
    f.read_exact(&mut h).map_err(|e| KmError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let h = String::from_utf8_lossy(&h);
    if !h.contains("'<f4'") || h.contains("'fortran_order': True") {
        return Err(bad("expected a C-order little-endian float32 array"));
    }
    let shape: Vec<usize> = h
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("header has no shape"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<_>>()?;
    if shape.len() != 2 {
        return Err(bad("expected a 2-D array [frames, dim]"));
    }
    Ok((shape[1], shape[0], (pre + hlen) as u64))
}

/// Frames of one feature shard (`DIR/STEM.npy` + `DIR/STEM.len`), read from disk on demand:
/// random batches with positioned reads (sorted and coalesced), full passes one utterance at a time.
pub struct ShardSource {
    dir: PathBuf,
    stem: String,
    npy: PathBuf,
    file: File,
    dim: usize,
    rows: usize,
    offset: u64,
    lengths: Vec<usize>,
}

impl ShardSource {
    pub fn open(dir: &Path, stem: &str) -> Result<Self> {
        // ShardReader validates dtype and that the .len index matches the .npy row count.
        let reader = ShardReader::<f32>::open(dir, stem)?;
        let lengths = reader.lengths().to_vec();
        let (npy, _) = shard_paths(dir, stem);
        let (dim, rows, offset) = npy_layout(&npy)?;
        let file = File::open(&npy).map_err(|e| KmError::Io {
            path: npy.clone(),
            source: e,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            npy,
            file,
            dim,
            rows,
            offset,
            lengths,
        })
    }
    /// Frames per utterance, in manifest order.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }
    pub fn path(&self) -> &Path {
        &self.npy
    }
}

impl FrameSource for ShardSource {
    fn dim(&self) -> usize {
        self.dim
    }
    fn n_frames(&self) -> usize {
        self.rows
    }
    fn gather(&self, idx: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let d = self.dim;
        let row_bytes = d * 4;
        out.clear();
        out.resize(idx.len() * d, 0.0);
        let mut order: Vec<usize> = (0..idx.len()).collect();
        order.sort_unstable_by_key(|&p| idx[p]);
        let mut buf = Vec::new();
        let mut s = 0;
        while s < order.len() {
            // A span of rows read with one call: extend while the next wanted row is near.
            let first = idx[order[s]];
            let mut e = s + 1;
            while e < order.len() && idx[order[e]] - first < 512 {
                e += 1;
            }
            let last = idx[order[e - 1]];
            if last >= self.rows {
                return Err(KmError::Invalid(format!(
                    "{}: row {last} out of range",
                    self.npy.display()
                )));
            }
            buf.resize((last - first + 1) * row_bytes, 0);
            self.file
                .read_exact_at(&mut buf, self.offset + (first * row_bytes) as u64)
                .map_err(|e| KmError::Io {
                    path: self.npy.clone(),
                    source: e,
                })?;
            for &p in &order[s..e] {
                let r = idx[p] - first;
                for (o, b) in out[p * d..(p + 1) * d]
                    .iter_mut()
                    .zip(buf[r * row_bytes..(r + 1) * row_bytes].chunks_exact(4))
                {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            s = e;
        }
        Ok(())
    }
    fn for_each_chunk(&self, f: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        let mut r = ShardReader::<f32>::open(&self.dir, &self.stem)?;
        let mut v = Vec::new();
        let mut row = 0;
        while r.next_into(&mut v)? {
            f(row, &v)?;
            row += v.len() / self.dim;
        }
        Ok(())
    }
}

/// Several sources seen as one (central mode over all clients).
pub struct ConcatSource {
    parts: Vec<Box<dyn FrameSource>>,
    starts: Vec<usize>,
    dim: usize,
    rows: usize,
}

impl ConcatSource {
    pub fn new(parts: Vec<Box<dyn FrameSource>>) -> Result<Self> {
        let dim = parts
            .first()
            .map(|p| p.dim())
            .ok_or_else(|| KmError::Invalid("no frame sources".into()))?;
        let mut starts = Vec::with_capacity(parts.len());
        let mut rows = 0;
        for (i, p) in parts.iter().enumerate() {
            if p.dim() != dim {
                return Err(KmError::Invalid(format!(
                    "source {i} has {}-dim frames, source 0 has {dim}",
                    p.dim()
                )));
            }
            starts.push(rows);
            rows += p.n_frames();
        }
        Ok(Self {
            parts,
            starts,
            dim,
            rows,
        })
    }
}

impl FrameSource for ConcatSource {
    fn dim(&self) -> usize {
        self.dim
    }
    fn n_frames(&self) -> usize {
        self.rows
    }
    fn gather(&self, idx: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let d = self.dim;
        out.clear();
        out.resize(idx.len() * d, 0.0);
        let mut per: Vec<(Vec<usize>, Vec<usize>)> =
            vec![(Vec::new(), Vec::new()); self.parts.len()];
        for (p, &i) in idx.iter().enumerate() {
            let s = self.starts.partition_point(|&st| st <= i) - 1;
            per[s].0.push(i - self.starts[s]);
            per[s].1.push(p);
        }
        let mut tmp = Vec::new();
        for (s, (local, pos)) in per.iter().enumerate() {
            if local.is_empty() {
                continue;
            }
            self.parts[s].gather(local, &mut tmp)?;
            for (r, &p) in pos.iter().enumerate() {
                out[p * d..(p + 1) * d].copy_from_slice(&tmp[r * d..(r + 1) * d]);
            }
        }
        Ok(())
    }
    fn for_each_chunk(&self, f: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        for (p, st) in self.parts.iter().zip(&self.starts) {
            p.for_each_chunk(&mut |r, x| f(st + r, x))?;
        }
        Ok(())
    }
}

/// A random fraction of a shard's utterances, for the fit only: fairseq's
/// `learn_kmeans.py --percent` (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// examples/hubert/simple_kmeans/learn_kmeans.py:L76 `load_feature_shard`), which draws
/// `ceil(utterances * percent)` of them without replacement. Labelling still covers every
/// utterance.
pub struct SampledSource {
    inner: ShardSource,
    /// (first row in `inner`, rows) of each kept utterance, in shard order.
    spans: Vec<(usize, usize)>,
    /// First row of each kept utterance in this source.
    starts: Vec<usize>,
    rows: usize,
}

/// The utterances [`SampledSource`] keeps of `n`: `ceil(n * percent)` of them drawn at `seed`,
/// in ascending order; `percent` is in (0, 1]. A client that featurizes only these (`fedhubert
/// layers`) fits on the same frames as a `SampledSource` over all of them.
pub fn sample_utterances(n: usize, percent: f64, seed: u64) -> Result<Vec<usize>> {
    use rand::SeedableRng;
    if !(percent > 0.0 && percent <= 1.0) {
        return Err(KmError::Invalid(format!(
            "percent must be in (0, 1], got {percent}"
        )));
    }
    let keep = ((n as f64 * percent).ceil() as usize).clamp(usize::from(n > 0), n);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = rand::seq::index::sample(&mut rng, n, keep).into_vec();
    chosen.sort_unstable();
    Ok(chosen)
}

impl SampledSource {
    /// Keeps `ceil(n * percent)` of `inner`'s `n` utterances, drawn at `seed`; `percent` is in
    /// (0, 1].
    pub fn new(inner: ShardSource, percent: f64, seed: u64) -> Result<Self> {
        let lengths = inner.lengths();
        let n = lengths.len();
        let chosen = sample_utterances(n, percent, seed)?;
        let mut first = Vec::with_capacity(n);
        let mut row = 0;
        for &len in lengths {
            first.push(row);
            row += len;
        }
        let spans: Vec<(usize, usize)> = chosen.iter().map(|&u| (first[u], lengths[u])).collect();
        let mut starts = Vec::with_capacity(spans.len());
        let mut rows = 0;
        for &(_, len) in &spans {
            starts.push(rows);
            rows += len;
        }
        Ok(Self {
            inner,
            spans,
            starts,
            rows,
        })
    }

    /// Utterances kept.
    pub fn utterances(&self) -> usize {
        self.spans.len()
    }
}

impl FrameSource for SampledSource {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn n_frames(&self) -> usize {
        self.rows
    }
    fn gather(&self, idx: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let mut mapped = Vec::with_capacity(idx.len());
        for &i in idx {
            if i >= self.rows {
                return Err(KmError::Invalid(format!(
                    "{}: sampled row {i} out of range",
                    self.inner.path().display()
                )));
            }
            let s = self.starts.partition_point(|&st| st <= i) - 1;
            mapped.push(self.spans[s].0 + (i - self.starts[s]));
        }
        self.inner.gather(&mapped, out)
    }
    fn for_each_chunk(&self, f: &mut dyn FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
        let mut buf = Vec::new();
        for (&(first, len), &start) in self.spans.iter().zip(&self.starts) {
            let rows: Vec<usize> = (first..first + len).collect();
            self.inner.gather(&rows, &mut buf)?;
            f(start, &buf)?;
        }
        Ok(())
    }
}
