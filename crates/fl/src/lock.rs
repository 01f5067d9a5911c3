//! The output folder's lock: one writer per folder for the writer's whole life.
//!
//! Two runs on one `--out` used to both exit 0 and leave the last writer's files, or a mix of
//! both when one died. Every command that writes a folder holds a [`FolderLock`] on it: an
//! exclusive OS lock (`flock`) on `DIR/.fedhubert.lock`, which the kernel releases when the
//! process dies however it dies, so a lock left by a killed run is stale by construction and is
//! taken over (and said so). The file also records who holds it (pid, host, command, start
//! time), so the refusal names the other run.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::FlError;

/// The lock file's name inside the locked folder.
pub const LOCK_FILE: &str = ".fedhubert.lock";

/// An exclusive lock on a folder, released on drop (or by the kernel when the process dies).
#[derive(Debug)]
pub struct FolderLock {
    path: PathBuf,
    // Held open: closing the file releases the lock.
    _file: File,
}

fn io_err(path: &Path, e: std::io::Error) -> FlError {
    FlError::Config(format!("{}: {e}", path.display()))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

impl FolderLock {
    /// Creates `dir` if missing and locks it for `command`. Another live holder is an error
    /// that names its pid, host and command; a lock file left by a dead process is taken over.
    /// A folder that cannot be written (read-only, no permission) fails here, before any work.
    pub fn acquire(dir: &Path, command: &str) -> Result<Self, FlError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            FlError::Config(format!("creating output folder {}: {e}", dir.display()))
        })?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                FlError::Config(format!(
                    "{}: cannot write the output folder: {e}",
                    dir.display()
                ))
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = read_holder(&mut file);
                return Err(FlError::Config(format!(
                    "{} is in use by another fedhubert run ({holder}); wait for it to finish, or choose another output folder",
                    dir.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(io_err(&path, e)),
        }
        let previous = read_holder(&mut file);
        if !previous.is_empty() {
            tracing::info!(
                "{}: taking over a stale lock ({previous}): that run is no longer alive",
                dir.display()
            );
        }
        let me = format!(
            "pid {} on host {}, `fedhubert {command}`, since unix time {}",
            std::process::id(),
            host_name(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        (|| {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(me.as_bytes())?;
            file.sync_all()
        })()
        .map_err(|e| io_err(&path, e))?;
        Ok(Self { path, _file: file })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Empty, not removed: removing would let a third run lock a new inode while a second
        // still waits on the old one. An empty file is a lock nobody holds.
        let _ = self._file.set_len(0);
    }
}

fn read_holder(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.take(1024).read_to_string(&mut s);
    s.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_a_released_one_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let first = FolderLock::acquire(&out, "pretrain").unwrap();
        let e = FolderLock::acquire(&out, "distill")
            .unwrap_err()
            .to_string();
        assert!(e.contains("in use by another fedhubert run"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains("fedhubert pretrain"), "{e}");
        drop(first);
        let again = FolderLock::acquire(&out, "distill").unwrap();
        assert!(again.path().is_file());
    }

    #[test]
    fn a_lock_file_left_by_a_dead_run_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "pid 999999 on host gone").unwrap();
        FolderLock::acquire(dir.path(), "kmeans").unwrap();
    }
}
