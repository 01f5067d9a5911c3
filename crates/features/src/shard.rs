//! Feature shards in fairseq's dump layout: `NAME.npy` (one 2-D little-endian array, all utterances'
//! frames stacked in manifest order) and `NAME.len` (one frame count per line, same order).
//!
//! Writing streams: the `.npy` header is written with a placeholder row count and patched on `finish`,
//! so memory is bounded by one utterance whatever the corpus size. Both files are written under a
//! temporary name and renamed into place only when complete: a crash never leaves a half shard.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::FeatureError;

/// Element types a shard can hold (features are `f32`, k-means labels `u16`).
pub trait NpyElem: Copy + Default + Send + Sync + 'static {
    const DESCR: &'static str;
    const SIZE: usize;
    fn write_le(vals: &[Self], out: &mut Vec<u8>);
    fn read_le(bytes: &[u8], out: &mut Vec<Self>);
}

impl NpyElem for f32 {
    const DESCR: &'static str = "<f4";
    const SIZE: usize = 4;
    fn write_le(vals: &[Self], out: &mut Vec<u8>) {
        out.reserve(vals.len() * 4);
        for v in vals {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn read_le(bytes: &[u8], out: &mut Vec<Self>) {
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
}

impl NpyElem for u16 {
    const DESCR: &'static str = "<u2";
    const SIZE: usize = 2;
    fn write_le(vals: &[Self], out: &mut Vec<u8>) {
        out.reserve(vals.len() * 2);
        for v in vals {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn read_le(bytes: &[u8], out: &mut Vec<Self>) {
        out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        );
    }
}

/// Header length fixed at 128 bytes so the row count can be patched in place after streaming.
const HEADER_LEN: usize = 128;

fn npy_header(descr: &str, rows: usize, dim: Option<usize>) -> Vec<u8> {
    let shape = match dim {
        Some(d) => format!("({rows}, {d})"),
        None => format!("({rows},)"),
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    let pad = HEADER_LEN - 10 - dict.len() - 1;
    h.extend_from_slice(&((HEADER_LEN - 10) as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.extend(std::iter::repeat_n(b' ', pad));
    h.push(b'\n');
    h
}

fn io_err(path: &Path, e: std::io::Error) -> FeatureError {
    FeatureError::Io {
        path: path.to_path_buf(),
        error: e,
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Paths of a shard named `stem` in `dir`: (`stem.npy`, `stem.len`).
pub fn shard_paths(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.npy")),
        dir.join(format!("{stem}.len")),
    )
}

/// Streams utterances into a shard. `dim` is `Some(d)` for 2-D features, `None` for 1-D labels.
pub struct ShardWriter<T: NpyElem> {
    npy_path: PathBuf,
    len_path: PathBuf,
    npy_tmp: PathBuf,
    len_tmp: PathBuf,
    /// `None` once finished (or taken by `finish`); a writer dropped unfinished removes its temporaries.
    npy: Option<BufWriter<File>>,
    len: Option<BufWriter<File>>,
    dim: Option<usize>,
    rows: usize,
    buf: Vec<u8>,
    _t: std::marker::PhantomData<T>,
}

impl<T: NpyElem> ShardWriter<T> {
    pub fn create(dir: &Path, stem: &str, dim: Option<usize>) -> Result<Self, FeatureError> {
        if dim == Some(0) {
            // Frames of zero values cannot be counted (and `push` would divide by zero).
            return Err(FeatureError::Shape(format!(
                "shard {stem} in {}: frame dim must be at least 1",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let (npy_path, len_path) = shard_paths(dir, stem);
        let (npy_tmp, len_tmp) = (tmp_path(&npy_path), tmp_path(&len_path));
        let mut npy = BufWriter::new(File::create(&npy_tmp).map_err(|e| io_err(&npy_tmp, e))?);
        let len = BufWriter::new(File::create(&len_tmp).map_err(|e| io_err(&len_tmp, e))?);
        npy.write_all(&npy_header(T::DESCR, 0, dim))
            .map_err(|e| io_err(&npy_tmp, e))?;
        Ok(Self {
            npy_path,
            len_path,
            npy_tmp,
            len_tmp,
            npy: Some(npy),
            len: Some(len),
            dim,
            rows: 0,
            buf: Vec::new(),
            _t: Default::default(),
        })
    }

    /// Appends one utterance: `values.len()` must be a multiple of `dim` (rows = frames).
    pub fn push(&mut self, values: &[T]) -> Result<(), FeatureError> {
        let d = self.dim.unwrap_or(1);
        if !values.len().is_multiple_of(d) {
            return Err(FeatureError::Shape(format!(
                "shard {}: utterance of {} values is not a whole number of {d}-dim frames",
                self.npy_path.display(),
                values.len()
            )));
        }
        let frames = values.len() / d;
        self.buf.clear();
        T::write_le(values, &mut self.buf);
        let (npy, len) = (
            self.npy.as_mut().expect("unfinished"),
            self.len.as_mut().expect("unfinished"),
        );
        npy.write_all(&self.buf)
            .map_err(|e| io_err(&self.npy_tmp, e))?;
        writeln!(len, "{frames}").map_err(|e| io_err(&self.len_tmp, e))?;
        self.rows += frames;
        Ok(())
    }

    /// Patches the row count, flushes, and renames both files into place.
    pub fn finish(mut self) -> Result<(PathBuf, PathBuf), FeatureError> {
        let (mut npy, mut len) = (
            self.npy.take().expect("unfinished"),
            self.len.take().expect("unfinished"),
        );
        npy.flush().map_err(|e| io_err(&self.npy_tmp, e))?;
        len.flush().map_err(|e| io_err(&self.len_tmp, e))?;
        let mut f = npy
            .into_inner()
            .map_err(|e| io_err(&self.npy_tmp, e.into_error()))?;
        f.seek(SeekFrom::Start(0))
            .map_err(|e| io_err(&self.npy_tmp, e))?;
        f.write_all(&npy_header(T::DESCR, self.rows, self.dim))
            .map_err(|e| io_err(&self.npy_tmp, e))?;
        f.sync_all().map_err(|e| io_err(&self.npy_tmp, e))?;
        drop(f);
        drop(len);
        std::fs::rename(&self.len_tmp, &self.len_path).map_err(|e| io_err(&self.len_path, e))?;
        std::fs::rename(&self.npy_tmp, &self.npy_path).map_err(|e| io_err(&self.npy_path, e))?;
        Ok((self.npy_path.clone(), self.len_path.clone()))
    }
}

impl<T: NpyElem> Drop for ShardWriter<T> {
    /// An unfinished writer (an error part-way, a panic) removes its temporary files: the folder is
    /// left as it was before `create`. After `finish` (even a failed one) the temporaries were
    /// renamed or are removed here too.
    fn drop(&mut self) {
        self.npy.take();
        self.len.take();
        let _ = std::fs::remove_file(&self.npy_tmp);
        let _ = std::fs::remove_file(&self.len_tmp);
    }
}

/// Reads a shard one utterance at a time (bounded memory), or whole.
pub struct ShardReader<T: NpyElem> {
    path: PathBuf,
    reader: BufReader<File>,
    lengths: Vec<usize>,
    next: usize,
    dim: usize,
    bytes: Vec<u8>,
    _t: std::marker::PhantomData<T>,
}

/// What an `.npy` header declares.
struct NpyHeader {
    descr: String,
    shape: Vec<usize>,
    /// Bytes before the data: magic, version, length field and the header dictionary.
    data_offset: u64,
}

/// Parses the header of an `.npy` file of `file_bytes` bytes. The header length field is checked
/// against the file before the header is read: a version-2 field can claim 4 GiB.
fn parse_header(
    path: &Path,
    r: &mut impl Read,
    file_bytes: u64,
) -> Result<NpyHeader, FeatureError> {
    let bad = |why: &str| FeatureError::Format {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let mut magic = [0u8; 10];
    r.read_exact(&mut magic).map_err(|e| io_err(path, e))?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err(bad("not an .npy file (bad magic)"));
    }
    let (hlen, prefix) = match magic[6] {
        1 => (u16::from_le_bytes([magic[8], magic[9]]) as u64, 10),
        2 | 3 => {
            let mut rest = [0u8; 2];
            r.read_exact(&mut rest).map_err(|e| io_err(path, e))?;
            let n = u32::from_le_bytes([magic[8], magic[9], rest[0], rest[1]]);
            (n as u64, 12)
        }
        v => return Err(bad(&format!("unsupported .npy version {v}"))),
    };
    if prefix + hlen > file_bytes {
        return Err(FeatureError::HeaderExceedsFile {
            path: path.to_path_buf(),
            what: format!("{hlen}-byte header"),
            declared: prefix + hlen,
            file_bytes,
        });
    }
    let mut h = vec![0u8; hlen as usize];
    r.read_exact(&mut h).map_err(|e| io_err(path, e))?;
    let h = String::from_utf8_lossy(&h).to_string();
    if h.contains("'fortran_order': True") {
        return Err(bad("fortran-order arrays are not supported"));
    }
    let descr = h
        .split("'descr':")
        .nth(1)
        .and_then(|s| s.split('\'').nth(1))
        .ok_or_else(|| bad("header has no descr"))?
        .to_string();
    let shape_s = h
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("header has no shape"))?;
    let shape = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NpyHeader {
        descr,
        shape,
        data_offset: prefix + hlen,
    })
}

/// Frame counts of a `.len` index, one per line.
fn read_lengths(len_path: &Path) -> Result<Vec<usize>, FeatureError> {
    let lf = File::open(len_path).map_err(|e| io_err(len_path, e))?;
    let mut lengths = Vec::new();
    for (i, line) in BufReader::new(lf).lines().enumerate() {
        let line = line.map_err(|e| io_err(len_path, e))?;
        let n = line
            .trim()
            .parse::<usize>()
            .map_err(|_| FeatureError::Format {
                path: len_path.to_path_buf(),
                why: format!("line {}: expected a frame count, found {line:?}", i + 1),
            })?;
        lengths.push(n);
    }
    Ok(lengths)
}

/// Checks what the header declares against the `.len` index and the file's size; returns `dim`.
/// Every later read is sized from these numbers, so they must describe bytes that exist.
fn check_layout<T: NpyElem>(
    npy_path: &Path,
    len_path: &Path,
    h: &NpyHeader,
    lengths: &[usize],
    file_bytes: u64,
) -> Result<usize, FeatureError> {
    let format = |why: String| FeatureError::Format {
        path: npy_path.to_path_buf(),
        why,
    };
    if h.descr != T::DESCR {
        return Err(format(format!("dtype {}, expected {}", h.descr, T::DESCR)));
    }
    let (rows, dim) = match h.shape[..] {
        [rows] => (rows, 1),
        [rows, dim] if dim > 0 => (rows, dim),
        _ => {
            return Err(format(format!(
                "shape {:?}, expected (rows,) or (rows, dim) with dim >= 1",
                h.shape
            )));
        }
    };
    let sum = lengths
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n))
        .ok_or_else(|| FeatureError::Format {
            path: len_path.to_path_buf(),
            why: "frame counts overflow when summed".into(),
        })?;
    if rows != sum {
        return Err(format(format!(
            "{:?} rows but the .len index sums to {sum} frames",
            h.shape
        )));
    }
    let available = file_bytes - h.data_offset;
    let declared = (rows as u64)
        .checked_mul(dim as u64)
        .and_then(|v| v.checked_mul(T::SIZE as u64));
    if declared != Some(available) {
        return Err(FeatureError::DataSize {
            path: npy_path.to_path_buf(),
            shape: h.shape.clone(),
            declared,
            available,
        });
    }
    Ok(dim)
}

impl<T: NpyElem> ShardReader<T> {
    /// Opens `stem.npy` + `stem.len`, checking dtype, that the index sums to the row count, and
    /// that the data section is exactly as long as the header's shape says.
    pub fn open(dir: &Path, stem: &str) -> Result<Self, FeatureError> {
        let (npy_path, len_path) = shard_paths(dir, stem);
        let lengths = read_lengths(&len_path)?;
        let f = File::open(&npy_path).map_err(|e| io_err(&npy_path, e))?;
        let file_bytes = f.metadata().map_err(|e| io_err(&npy_path, e))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, f);
        let header = parse_header(&npy_path, &mut reader, file_bytes)?;
        let dim = check_layout::<T>(&npy_path, &len_path, &header, &lengths, file_bytes)?;
        Ok(Self {
            path: npy_path,
            reader,
            lengths,
            next: 0,
            dim,
            bytes: Vec::new(),
            _t: Default::default(),
        })
    }

    /// Frame counts per utterance, in manifest order.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Values per frame (1 for label shards).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Reads the next utterance into `out` (cleared first); `Ok(false)` at the end.
    pub fn next_into(&mut self, out: &mut Vec<T>) -> Result<bool, FeatureError> {
        let Some(&frames) = self.lengths.get(self.next) else {
            return Ok(false);
        };
        self.next += 1;
        self.bytes.resize(frames * self.dim * T::SIZE, 0);
        self.reader
            .read_exact(&mut self.bytes)
            .map_err(|e| io_err(&self.path, e))?;
        out.clear();
        T::read_le(&self.bytes, out);
        Ok(true)
    }

    /// Reads every remaining utterance.
    pub fn read_all(mut self) -> Result<Vec<Vec<T>>, FeatureError> {
        let mut all = Vec::with_capacity(self.lengths.len());
        let mut v = Vec::new();
        while self.next_into(&mut v)? {
            all.push(std::mem::take(&mut v));
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_f32_and_u16() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::<f32>::create(dir.path(), "mfcc", Some(3)).unwrap();
        w.push(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        w.push(&[7.0, 8.0, 9.0]).unwrap();
        assert!(w.push(&[1.0]).is_err());
        w.finish().unwrap();
        let r = ShardReader::<f32>::open(dir.path(), "mfcc").unwrap();
        assert_eq!(r.lengths(), &[2, 1]);
        assert_eq!(r.dim(), 3);
        let all = r.read_all().unwrap();
        assert_eq!(all[1], vec![7.0, 8.0, 9.0]);

        let mut w = ShardWriter::<u16>::create(dir.path(), "km", None).unwrap();
        w.push(&[3, 4, 5]).unwrap();
        w.finish().unwrap();
        assert!(
            ShardReader::<f32>::open(dir.path(), "km").is_err(),
            "dtype mismatch must be an error"
        );
        let all = ShardReader::<u16>::open(dir.path(), "km")
            .unwrap()
            .read_all()
            .unwrap();
        assert_eq!(all, vec![vec![3, 4, 5]]);
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::<f32>::create(dir.path(), "x", Some(2)).unwrap();
        w.push(&[1.0, 2.0]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// An `.npy` with a hand-written header dictionary (version 1) and `data` after it.
    fn raw_npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend((dict.len() as u16).to_le_bytes());
        v.extend(dict.as_bytes());
        v.extend(data);
        v
    }

    fn open_raw(npy: &[u8], len: &str) -> Result<ShardReader<f32>, FeatureError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.npy"), npy).unwrap();
        std::fs::write(dir.path().join("x.len"), len).unwrap();
        ShardReader::<f32>::open(dir.path(), "x")
    }

    #[test]
    fn shape_larger_than_the_file_is_an_error_before_any_read() {
        // 10 rows of 10^12 values: reading the first row once tried to allocate 4 TB.
        let npy = raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (10, 1000000000000), }",
            &[0u8; 16],
        );
        let err = open_raw(&npy, "10\n").err().unwrap();
        let msg = err.to_string();
        assert!(
            matches!(
                &err,
                FeatureError::DataSize {
                    declared: Some(40_000_000_000_000),
                    available: 16,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("x.npy") && msg.contains("40000000000000"),
            "{msg}"
        );
        // A product beyond u64 is reported as such, not wrapped around.
        let npy = raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 18446744073709551615), }",
            &[],
        );
        let err = open_raw(&npy, "1\n").err().unwrap();
        assert!(
            matches!(err, FeatureError::DataSize { declared: None, .. }),
            "{err}"
        );
        // Trailing bytes are as wrong as missing ones.
        let npy = raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }",
            &[0u8; 12],
        );
        let err = open_raw(&npy, "1\n").err().unwrap();
        assert!(
            matches!(
                err,
                FeatureError::DataSize {
                    declared: Some(8),
                    available: 12,
                    ..
                }
            ),
            "{err}"
        );
        let npy = raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }",
            &[0u8; 8],
        );
        assert_eq!(
            open_raw(&npy, "1\n").unwrap().read_all().unwrap(),
            vec![vec![0.0; 2]]
        );
    }

    #[test]
    fn header_length_beyond_the_file_is_an_error() {
        // Version 2 carries a 32-bit header length: 4 GiB claimed by a 12-byte file.
        let npy = b"\x93NUMPY\x02\x00\xff\xff\xff\xff".to_vec();
        let err = open_raw(&npy, "1\n").err().unwrap();
        assert!(
            matches!(&err, FeatureError::HeaderExceedsFile { file_bytes: 12, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("x.npy"), "{err}");
    }

    #[test]
    fn odd_shapes_and_index_overflow_are_errors() {
        let dict =
            |shape: &str| format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        for shape in ["(2, 1, 1)", "(2, 0)", "()"] {
            let err = open_raw(&raw_npy(&dict(shape), &[0u8; 8]), "2\n")
                .err()
                .unwrap();
            assert!(matches!(err, FeatureError::Format { .. }), "{shape}: {err}");
        }
        let max = usize::MAX;
        let err = open_raw(&raw_npy(&dict("(1,)"), &[0u8; 4]), &format!("{max}\n1\n"))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("x.len") && err.to_string().contains("overflow"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(ShardWriter::<f32>::create(dir.path(), "z", Some(0)).is_err());
    }

    #[test]
    fn truncated_shard_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::<f32>::create(dir.path(), "x", Some(2)).unwrap();
        w.push(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        w.finish().unwrap();
        std::fs::write(dir.path().join("x.len"), "2\n5\n").unwrap();
        let err = ShardReader::<f32>::open(dir.path(), "x")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("x.npy"), "{err}");
    }
}
