//! The module graph of the library (`src/`) and the dashboard
//! (`dashboard/src/`), read from the source: which top-level modules (a
//! folder counted as one) and which files depend on which, through
//! `crate::` and `super::` paths. A cycle makes two concerns one; new ones
//! fail this test. The cycles that predate it are listed in
//! [`KNOWN_TOP_LEVEL_CYCLES`] and [`KNOWN_FILE_CYCLES`]: the restructure
//! of issue 26 takes them apart, and the test says when a listed one is
//! gone so the list shrinks with it.
//!
//! Run it alone to print the graph's cycles:
//! `cargo test -p outbox --features testing --test foundation module_cycles -- --nocapture`.
//!
//! What counts as an edge: a path `crate::a::...` in a file of module `b`
//! is an edge b -> a; at file level the path resolves to the deepest file
//! it names (`src/a/b.rs`, `src/a/b/mod.rs`, `src/a.rs`, ...), and
//! `super::x` to the sibling `x.rs`. A folder's `mod.rs` is the folder's
//! face (it re-exports its files), so edges out of a `mod.rs` are not
//! counted at file level; `lib.rs` (the crate's re-exports) is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Strongly connected groups of top-level modules of the library that
/// predate the check (2026-12-07).
const KNOWN_TOP_LEVEL_CYCLES: &[&[&str]] = &[&[
    "cloudevents",
    "consumer",
    "contract",
    "event_log",
    "failed_jobs",
    "maintenance",
    "projection",
    "registry",
    "relay",
    "replay",
    "webhooks",
]];

/// Strongly connected groups of the library's files that predate the check.
const KNOWN_FILE_CYCLES: &[&[&str]] = &[];

/// A crate's source files, by path relative to its `src/`.
fn sources(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Code without comments (line and doc comments), so paths in prose do
/// not count.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::` path in `code`, as its segments; `use crate::{a, b::c}`
/// gives both.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = matching_brace(group);
            for item in split_top_level(&group[..end]) {
                paths.push(segments(item.trim()));
            }
        } else {
            paths.push(segments(rest));
        }
    }
    paths.retain(|p| !p.is_empty());
    paths
}

fn matching_brace(text: &str) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// The lowercase path segments at the start of `text` (`a::b::Item` gives
/// a, b; `a::f()` gives a, f: a function is resolved to its file).
fn segments(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in text.split("::") {
        let name: String = part
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            break;
        }
        let whole = name.len() == part.len();
        out.push(name);
        if !whole {
            break;
        }
    }
    out
}

/// The top-level module of a file: its first path component, without `.rs`.
fn top_level(file: &Path) -> Option<String> {
    let first = file.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// The deepest file of `files` that `segments` names.
fn resolve(files: &BTreeSet<PathBuf>, segments: &[String]) -> Option<PathBuf> {
    for n in (1..=segments.len()).rev() {
        let base: PathBuf = segments[..n].iter().collect();
        for candidate in [base.with_extension("rs"), base.join("mod.rs")] {
            if files.contains(&candidate) {
                return Some(candidate);
            }
        }
    }
    None
}

/// Tarjan's strongly connected components with more than one node.
fn cycles<N: Ord + Clone>(edges: &BTreeMap<N, BTreeSet<N>>) -> Vec<BTreeSet<N>> {
    struct State<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        stack: Vec<N>,
        on_stack: BTreeSet<N>,
        next: usize,
        found: Vec<BTreeSet<N>>,
    }
    fn visit<N: Ord + Clone>(node: &N, edges: &BTreeMap<N, BTreeSet<N>>, s: &mut State<N>) {
        s.index.insert(node.clone(), s.next);
        s.low.insert(node.clone(), s.next);
        s.next += 1;
        s.stack.push(node.clone());
        s.on_stack.insert(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if !s.index.contains_key(next) {
                visit(next, edges, s);
                let low = s.low[node].min(s.low[next]);
                s.low.insert(node.clone(), low);
            } else if s.on_stack.contains(next) {
                let low = s.low[node].min(s.index[next]);
                s.low.insert(node.clone(), low);
            }
        }
        if s.low[node] == s.index[node] {
            let mut group = BTreeSet::new();
            while let Some(top) = s.stack.pop() {
                s.on_stack.remove(&top);
                let done = &top == node;
                group.insert(top);
                if done {
                    break;
                }
            }
            if group.len() > 1 {
                s.found.push(group);
            }
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for node in edges.keys() {
        if !s.index.contains_key(node) {
            visit(node, edges, &mut s);
        }
    }
    s.found
}

/// The top-level and file-level graphs of the crate at `root`.
fn graphs(
    root: &Path,
) -> (
    BTreeMap<String, BTreeSet<String>>,
    BTreeMap<String, BTreeSet<String>>,
) {
    let sources = sources(root);
    let files: BTreeSet<PathBuf> = sources.keys().cloned().collect();
    let (mut modules, mut file_edges) = (BTreeMap::new(), BTreeMap::new());
    for (file, text) in &sources {
        let code = code_of(text);
        let from = top_level(file);
        let is_face = ["mod.rs", "lib.rs", "main.rs"]
            .iter()
            .any(|face| file.as_os_str() == *face || file.file_name().is_some_and(|n| n == "mod.rs"));
        let mut targets: Vec<PathBuf> = crate_paths(&code)
            .iter()
            .filter_map(|path| resolve(&files, path))
            .collect();
        // super::x from a file of a folder: its sibling x (or the folder's mod.rs).
        if !is_face && let Some(dir) = file.parent() {
            let mut rest = code.as_str();
            while let Some(at) = rest.find("super::") {
                rest = &rest[at + "super::".len()..];
                let path = segments(rest);
                let mut full: Vec<String> = dir.iter().map(|c| c.to_string_lossy().into_owned()).collect();
                full.extend(path);
                if let Some(target) = resolve(&files, &full) {
                    targets.push(target);
                }
            }
        }
        for target in targets {
            if let (Some(a), Some(b)) = (&from, top_level(&target))
                && *a != b
            {
                modules.entry(a.clone()).or_insert_with(BTreeSet::new).insert(b);
            }
            if !is_face && target != *file {
                file_edges
                    .entry(file.display().to_string())
                    .or_insert_with(BTreeSet::new)
                    .insert(target.display().to_string());
            }
        }
    }
    (modules, file_edges)
}

/// Cycles of `found` not inside a known one (new), and known ones no part
/// of which is a cycle any more (gone).
fn judge(found: &[BTreeSet<String>], known: &[&[&str]]) -> (Vec<String>, Vec<String>) {
    let known: Vec<BTreeSet<String>> = known
        .iter()
        .map(|k| k.iter().map(|s| (*s).to_owned()).collect())
        .collect();
    let new = found
        .iter()
        .filter(|f| !known.iter().any(|k| f.is_subset(k)))
        .map(|f| f.iter().cloned().collect::<Vec<_>>().join(" <-> "))
        .collect();
    let gone = known
        .iter()
        .filter(|k| !found.iter().any(|f| f.is_subset(k)))
        .map(|k| k.iter().cloned().collect::<Vec<_>>().join(", "))
        .collect();
    (new, gone)
}

fn check_crate(name: &str, root: &Path, known_modules: &[&[&str]], known_files: &[&[&str]]) {
    let (modules, files) = graphs(root);
    let module_cycles = cycles(&modules);
    let file_cycles = cycles(&files);
    println!("{name}: top-level module cycles: {module_cycles:?}");
    println!("{name}: file cycles: {file_cycles:?}");
    let (new_modules, gone_modules) = judge(&module_cycles, known_modules);
    let (new_files, gone_files) = judge(&file_cycles, known_files);
    assert!(
        new_modules.is_empty() && new_files.is_empty(),
        "{name}: new dependency cycles: modules {new_modules:?}, files {new_files:?} (a cycle makes two concerns one: depend one way)"
    );
    assert!(
        gone_modules.is_empty() && gone_files.is_empty(),
        "{name}: listed cycles are gone, take them off the known lists in {}: modules {gone_modules:?}, files {gone_files:?}",
        file!()
    );
}

#[test]
fn the_library_gains_no_module_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    check_crate("outbox", &root, KNOWN_TOP_LEVEL_CYCLES, KNOWN_FILE_CYCLES);
}

#[test]
fn the_dashboard_gains_no_module_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard/src");
    // None left (the roles, the viewer and the page frame have files of
    // their own since 2026-12-07): any cycle is new.
    check_crate("outbox-dashboard", &root, &[], &[]);
}

#[test]
fn the_graph_reader_sees_paths_groups_and_cycles() {
    assert_eq!(
        crate_paths(&code_of(
            "use crate::{a::B, c::d::{E, f}};\nlet x = crate::g::h(); // crate::comment"
        )),
        vec![
            vec!["a".to_owned()],
            vec!["c".to_owned(), "d".to_owned()],
            vec!["g".to_owned(), "h".to_owned()]
        ]
    );
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    edges.entry("a").or_default().insert("b");
    edges.entry("b").or_default().insert("a");
    edges.entry("b").or_default().insert("c");
    let found = cycles(&edges);
    assert_eq!(found, vec![["a", "b"].into_iter().collect::<BTreeSet<_>>()]);
}
