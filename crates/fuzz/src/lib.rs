//! Time-bounded fuzzing of every reader of untrusted files, on the stable toolchain.
//!
//! cargo-fuzz needs nightly; this crate gets most of its value with proptest instead: each target
//! is a property ("returns `Ok` or a typed error naming the file, never panics, never makes a
//! huge allocation") checked on generated inputs until a deadline, and a failure is shrunk to a
//! minimal input by proptest. Inputs are mutated real files (bit flips, truncations, inserted
//! bytes, header words overwritten with boundary values), structured headers with extreme
//! fields, and plain random bytes, which rarely get past a magic number but cost nothing.
//!
//! A panic is caught and shrunk. An abort (a failed allocation) cannot be caught, so the
//! allocator of the fuzz binaries records the largest single request of each execution
//! ([`alloc_guard`]) and a request above [`ALLOC_CAP`] fails the property long before one could
//! abort the process.
//!
//! `FEDHUBERT_FUZZ_SECS` sets the seconds per target (default [`DEFAULT_SECS`], so that all
//! targets of `tests/targets.rs` take well under a minute on two cores). Longer runs by hand:
//! `FEDHUBERT_FUZZ_SECS=600 cargo test -p fedhubert-fuzz --release -- --test-threads 1`.

pub mod alloc_guard;
pub mod mutate;
pub mod seeds;

use std::cell::Cell;
use std::io::Write;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

/// Seconds per target when `FEDHUBERT_FUZZ_SECS` is unset.
pub const DEFAULT_SECS: f64 = 6.0;

/// Largest single allocation an execution may request. The inputs are at most a few hundred
/// KiB, so anything near this is a buffer sized from a header rather than from data.
pub const ALLOC_CAP: usize = 64 << 20;

/// Cases per proptest runner; each batch gets a fresh seed, so a long run keeps exploring.
const BATCH: u32 = 64;

/// The time budget of one target: `FEDHUBERT_FUZZ_SECS` or [`DEFAULT_SECS`].
pub fn budget() -> Duration {
    let secs = match std::env::var("FEDHUBERT_FUZZ_SECS") {
        Ok(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .unwrap_or_else(|| panic!("FEDHUBERT_FUZZ_SECS={s:?} is not a number of seconds")),
        Err(_) => DEFAULT_SECS,
    };
    Duration::from_secs_f64(secs)
}

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Panics inside a fuzzed call are expected while shrinking (proptest catches each); printing
/// every one (with a backtrace when RUST_BACKTRACE is set) would bury the one report that counts.
/// The hook stays quiet only on threads that are inside a fuzzed call.
fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Keeps this thread's panics quiet while alive, also when a panic unwinds through it.
struct Quiet;

impl Quiet {
    fn on() -> Self {
        QUIET.with(|q| q.set(true));
        Quiet
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        QUIET.with(|q| q.set(false));
    }
}

/// What one target did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub executions: u64,
    /// Executions whose input the reader accepted (`Ok`): a target whose inputs never get past
    /// the first check explores nothing, so the share is reported too.
    pub accepted: u64,
    pub elapsed: Duration,
}

/// Checks `property` on values of `strategy` until the budget is spent, and returns how many
/// executions ran. The property returns `Ok(true)` when the reader accepted the input, `Ok(false)`
/// when it refused it with a proper error, and `Err(why)` when the property is violated. Panics with the shrunk, minimal failing input when the property fails, panics
/// or allocates more than [`ALLOC_CAP`] at once. The count is written to stderr directly, so the
/// test harness's capture does not hide it.
pub fn fuzz<S>(
    name: &str,
    strategy: S,
    property: impl Fn(&S::Value) -> Result<bool, String>,
) -> Report
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    fuzz_for(name, budget(), strategy, property)
}

/// [`fuzz`] with an explicit budget.
pub fn fuzz_for<S>(
    name: &str,
    budget: Duration,
    strategy: S,
    property: impl Fn(&S::Value) -> Result<bool, String>,
) -> Report
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    install_quiet_hook();
    let start = Instant::now();
    let deadline = start + budget;
    let executions = Cell::new(0u64);
    let accepted = Cell::new(0u64);
    let mut batch = 0u64;
    while Instant::now() < deadline {
        let config = Config {
            cases: BATCH,
            failure_persistence: None,
            max_shrink_time: 120_000,
            ..Config::default()
        };
        // A fixed sequence of seeds: a failure found in CI reproduces with the same budget.
        let seed = format!("fedhubert-fuzz/{name}/{batch:016}");
        let mut seed_bytes = [0u8; 32];
        for (i, b) in seed.bytes().enumerate() {
            seed_bytes[i % 32] ^= b.rotate_left(i as u32 / 32);
        }
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
        let mut runner = TestRunner::new_with_rng(config, rng);
        let outcome = runner.run(&strategy, |value| {
            if Instant::now() >= deadline {
                return Ok(());
            }
            executions.set(executions.get() + 1);
            alloc_guard::take_largest();
            let result = {
                let _quiet = Quiet::on();
                property(&value)
            };
            let largest = alloc_guard::take_largest();
            if largest > ALLOC_CAP {
                return Err(TestCaseError::fail(format!(
                    "one allocation of {largest} bytes (cap {ALLOC_CAP}): a buffer sized from a header?"
                )));
            }
            let ok = result.map_err(TestCaseError::fail)?;
            accepted.set(accepted.get() + ok as u64);
            Ok(())
        });
        match outcome {
            Ok(()) => {}
            Err(TestError::Fail(why, minimal)) => {
                panic!("fuzz target {name} failed: {why}\nminimal input: {minimal:#?}")
            }
            Err(TestError::Abort(why)) => panic!("fuzz target {name} aborted: {why}"),
        }
        batch += 1;
    }
    let report = Report {
        executions: executions.get(),
        accepted: accepted.get(),
        elapsed: start.elapsed(),
    };
    let _ = writeln!(
        std::io::stderr(),
        "fuzz {name}: {} executions in {:.1} s ({} inputs accepted)",
        report.executions,
        report.elapsed.as_secs_f64(),
        report.accepted
    );
    report
}

/// `Ok(false)` (refused properly) when `message` names `file`, else a property violation:
/// errors must say which file is wrong.
pub fn names_file(message: &str, file: &str) -> Result<bool, String> {
    if message.contains(file) {
        Ok(false)
    } else {
        Err(format!("error does not name {file}: {message}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::any;

    #[test]
    #[should_panic(expected = "minimal input")]
    fn a_failing_property_is_reported_with_its_shrunk_input() {
        // The harness must be able to fail: a property broken by any byte >= 0xF0.
        fuzz_for(
            "self-test",
            Duration::from_secs(60),
            vec(any::<u8>(), 0..64),
            |b| match b.iter().any(|&x| x >= 0xF0) {
                true => Err("found".into()),
                false => Ok(true),
            },
        );
    }

    #[test]
    #[should_panic(expected = "one allocation of")]
    fn a_huge_allocation_fails_the_property() {
        fuzz_for(
            "self-test-alloc",
            Duration::from_secs(60),
            any::<u8>(),
            |_| {
                let v: Vec<u8> = Vec::with_capacity(ALLOC_CAP + 1);
                drop(v);
                Ok(true)
            },
        );
    }
}
