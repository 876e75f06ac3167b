//! Finding a sibling executable: `outbox bench` runs `outbox-bench`, and
//! the bench starts `outbox relay` processes.

use std::path::PathBuf;

/// The executable `name` in the directory of the running executable, else
/// the first one on `PATH`; `None` when there is neither.
pub fn beside_or_on_path(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(name)));
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside.into_iter().chain(on_path).find(|path| path.is_file())
}
