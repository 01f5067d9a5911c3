//! What every crate shares and none of it needs burn for: the host tensor type ([`Weights`]),
//! atomic writes (a reader never sees half a file, a crash never leaves one), safetensors files
//! whose bytes depend only on their contents, and the named random streams ([`seeds`]).

pub mod provenance;
pub mod seeds;
pub mod tensor;

pub use tensor::{
    Tensor, TensorError, Weights, load_safetensors, order_metadata, save_safetensors,
};

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{SafeTensorError, View};

/// Writes `bytes` to `path` through a temporary file in the same folder (created if missing),
/// fsync, rename, fsync of the folder: the file is either the old one or the whole new one, also
/// after a power cut.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a file path: {}", path.display()),
        )
    })?;
    // Hidden, and unique per process, so two writers of one path never share a temp file.
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsyncs a folder, so the renames into it survive a power cut: without it the kernel may
/// bring back the old file (or none) after a crash, although the new file's data was synced.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)?.sync_all()
}

/// The version of a file whose metadata names `format`: 1 for the first layout, which spelled
/// it `{format}-v1`, else its `format_version`; None when the file is of another format.
pub fn format_version(meta: &BTreeMap<String, String>, format: &str) -> Option<u32> {
    let named = meta.get("format")?;
    if named.strip_suffix("-v1") == Some(format) {
        return Some(1);
    }
    (named == format).then(|| meta.get("format_version")?.parse().ok())?
}

/// Metadata key of the per-tensor CRC-32 checksums every fedhubert safetensors file carries:
/// bytes flipped in a checkpoint used to go unnoticed by resume, export, embed and probe.
pub const CHECKSUMS_KEY: &str = "fedhubert_crc32";

/// `{"tensor name": "crc32 in hex", ...}` of the tensors' data, in name order.
fn checksums<S: AsRef<str>, V: View>(tensors: &[(S, V)]) -> String {
    let map: BTreeMap<&str, String> = tensors
        .iter()
        .map(|(n, v)| (n.as_ref(), format!("{:08x}", crc32fast::hash(&v.data()))))
        .collect();
    serde_json::to_string(&map).unwrap_or_default()
}

/// Errors, naming the tensor, unless every tensor's data matches the checksum its writer
/// stored (`checksums`: the [`CHECKSUMS_KEY`] metadata; files written elsewhere, such as a
/// transformers checkpoint, have none and are read as they are).
pub fn verify_checksums(
    st: &safetensors::SafeTensors<'_>,
    checksums: Option<&String>,
) -> Result<(), String> {
    let Some(json) = checksums else {
        return Ok(());
    };
    let want: BTreeMap<String, String> = serde_json::from_str(json)
        .map_err(|e| format!("metadata {CHECKSUMS_KEY} is not a checksum table: {e}"))?;
    let names = st.names();
    if let Some(missing) = want.keys().find(|n| !names.contains(&n.as_str())) {
        return Err(format!(
            "tensor `{missing}` is listed in the checksums but not in the file (truncated or edited)"
        ));
    }
    for (name, view) in st.tensors() {
        let got = format!("{:08x}", crc32fast::hash(view.data()));
        match want.get(&name) {
            Some(w) if *w == got => {}
            Some(w) => {
                return Err(format!(
                    "tensor `{name}`: checksum {got}, but {w} when written: the file is corrupt (bytes changed after it was written)"
                ));
            }
            None => {
                return Err(format!(
                    "tensor `{name}` has no checksum: the file was edited"
                ));
            }
        }
    }
    Ok(())
}

/// safetensors bytes whose header lists `__metadata__` in key order. `safetensors::serialize`
/// takes the metadata as a `HashMap` and writes it in hash order, so the same checkpoint written
/// twice differed byte-wise; a resumed run must be able to reproduce its files exactly.
pub fn safetensors_bytes<S, V, I>(
    tensors: I,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, SafeTensorError>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: View,
    I: IntoIterator<Item = (S, V)>,
{
    let tensors: Vec<(S, V)> = tensors.into_iter().collect();
    let mut metadata = metadata.clone();
    metadata.insert(CHECKSUMS_KEY.into(), checksums(&tensors));
    let metadata = &metadata;
    let plain = safetensors::serialize(tensors, None)?;
    let n = u64::from_le_bytes(plain[..8].try_into().expect("8-byte header length")) as usize;
    let header = std::str::from_utf8(&plain[8..8 + n])
        .expect("safetensors writes a UTF-8 header")
        .trim_end();
    let body = &plain[8 + n..];
    // The tensors' part of the header is deterministic (sorted by dtype, then name); only the
    // metadata needs ordering, so splice it in front of the tensor entries.
    let rest = header
        .strip_prefix('{')
        .expect("safetensors header is a JSON object");
    let meta_json = serde_json::to_string(metadata).map_err(SafeTensorError::JsonError)?;
    let sep = if rest == "}" { "" } else { "," };
    let mut new_header = format!("{{\"__metadata__\":{meta_json}{sep}{rest}").into_bytes();
    new_header.resize(new_header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + new_header.len() + body.len());
    out.extend((new_header.len() as u64).to_le_bytes());
    out.extend(new_header);
    out.extend(body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_flipped_byte_is_found_and_the_tensor_named() {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [4.0f32].iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = vec![
            ("w.a", TensorView::new(Dtype::F32, vec![3], &a).unwrap()),
            ("w.b", TensorView::new(Dtype::F32, vec![1], &b).unwrap()),
        ];
        let mut bytes = safetensors_bytes(views, &meta(&[("x", "1")])).unwrap();
        let check = |bytes: &[u8]| {
            let (_, m) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
            let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
            verify_checksums(&st, m.metadata().as_ref().unwrap().get(CHECKSUMS_KEY))
        };
        check(&bytes).unwrap();
        // The last data byte belongs to w.b (tensors are laid out in name order).
        *bytes.last_mut().unwrap() ^= 0x10;
        let e = check(&bytes).unwrap_err();
        assert!(e.contains("`w.b`") && e.contains("corrupt"), "{e}");
    }

    #[test]
    fn metadata_is_sorted_and_file_reads_back() {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [4.0f32].iter().flat_map(|x| x.to_le_bytes()).collect();
        let m = meta(&[
            ("zeta", "1"),
            ("alpha", "2"),
            ("mid", "three"),
            ("q", "\"quoted\""),
        ]);
        let write = || {
            let views = vec![
                ("w.b", TensorView::new(Dtype::F32, vec![1], &b).unwrap()),
                ("w.a", TensorView::new(Dtype::F32, vec![3], &a).unwrap()),
            ];
            safetensors_bytes(views, &m).unwrap()
        };
        let first = write();
        // HashMap order would differ between writes within a process, from new RandomState seeds.
        for _ in 0..20 {
            assert_eq!(write(), first);
        }
        let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&first[8..8 + n]).unwrap();
        let pos = |k: &str| header.find(&format!("\"{k}\"")).unwrap();
        assert!(pos("alpha") < pos("mid") && pos("mid") < pos("q") && pos("q") < pos("zeta"));
        let (_, parsed) = safetensors::SafeTensors::read_metadata(&first).unwrap();
        let got = parsed.metadata().clone().unwrap();
        // The four given, and the checksums every file carries.
        assert_eq!(got.len(), 5);
        assert!(got.contains_key(CHECKSUMS_KEY));
        assert_eq!(got["q"], "\"quoted\"");
        let st = safetensors::SafeTensors::deserialize(&first).unwrap();
        assert_eq!(st.tensor("w.a").unwrap().data(), &a[..]);
        assert_eq!(st.tensor("w.b").unwrap().data(), &b[..]);
    }

    #[test]
    fn format_versions() {
        let v = |pairs: &[(&str, &str)]| format_version(&meta(pairs), "fedhubert-x");
        assert_eq!(v(&[("format", "fedhubert-x-v1")]), Some(1));
        assert_eq!(
            v(&[("format", "fedhubert-x"), ("format_version", "2")]),
            Some(2)
        );
        assert_eq!(v(&[("format", "fedhubert-x")]), None);
        assert_eq!(v(&[("format", "other"), ("format_version", "2")]), None);
        assert_eq!(v(&[]), None);
    }

    #[test]
    fn metadata_only_file() {
        let views: Vec<(&str, TensorView<'_>)> = vec![];
        let bytes = safetensors_bytes(views, &meta(&[("k", "v")])).unwrap();
        let (_, parsed) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(parsed.metadata().clone().unwrap()["k"], "v");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/out.bin");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        // A folder in the way is an error, not a panic, and leaves no temp file behind.
        std::fs::create_dir_all(dir.path().join("d/x")).unwrap();
        assert!(atomic_write(&dir.path().join("d/x"), b"z").is_err());
        assert_eq!(std::fs::read_dir(dir.path().join("d")).unwrap().count(), 1);
    }
}
