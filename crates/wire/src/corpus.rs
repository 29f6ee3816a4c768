//! Runs the files of a fuzz corpus folder through a target's checks; shared by the
//! codec's corpus test (`crates/wire/tests/corpus.rs`) and the switch's
//! (`tests/fuzz_corpus.rs`). Built with the `fuzzing` feature only.

use std::path::{Path, PathBuf};

/// The check a fuzz target runs on one input.
pub type Check = fn(&[u8]);

/// Fewest seed files a target's corpus folder must hold.
pub const SEEDS_PER_TARGET_MIN: usize = 5;

/// Every file of `<corpus>/<target>/`, sorted, with its contents.
pub fn corpus_files(corpus: &Path, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus.join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    files.sort();
    files
}

/// Runs every corpus file of `target` through its check in `targets`; fails naming
/// the files whose check panicked.
pub fn run_target(corpus: &Path, targets: &[(&str, Check)], target: &str) {
    let check = targets
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, check)| *check)
        .unwrap_or_else(|| panic!("no target {target}"));
    let files = corpus_files(corpus, target);
    assert!(
        files.len() >= SEEDS_PER_TARGET_MIN,
        "{target}: only {} corpus files",
        files.len()
    );
    let mut failed = Vec::new();
    for (path, bytes) in &files {
        if std::panic::catch_unwind(|| check(bytes)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} corpus files fail: {failed:#?}",
        failed.len()
    );
}
