//! The source tree keeps the shape the README describes: no two modules of a crate import
//! each other (directly or through others), and no source file grows past what one reader
//! can hold. Module edges are the `crate::` paths a file names; `mod.rs` counts as its
//! folder's module, so a child importing an item its parent's `mod.rs` declares is a cycle.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Crates whose `src/` is checked (the eBPF crate is one small program per file).
// kpsc-bench joins once its interrupt/netns cycle is cut (in progress on another branch).
const CRATES: &[&str] = &["kpsc-userspace", "kpsc-common", "tests", "xtask"];
/// Longest source file allowed, in lines.
const MAX_LINES: usize = 800;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `a/b.rs` -> `a::b`, `a/mod.rs` -> `a`, `lib.rs`/`main.rs` -> the crate root ("").
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// Every path named after `crate::`, with `{a, b::{c}}` groups expanded.
fn crate_paths(source: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if !preceded_by_ident {
            expand(rest, String::new(), &mut paths);
        }
    }
    paths
}

/// Parses one use-tree at the start of `text` below `prefix`.
fn expand(text: &str, prefix: String, out: &mut Vec<String>) -> usize {
    let text_trimmed = text.trim_start();
    let skipped = text.len() - text_trimmed.len();
    if let Some(inner) = text_trimmed.strip_prefix('{') {
        let mut used = 1;
        let mut cursor = inner;
        loop {
            let n = expand(cursor, prefix.clone(), out);
            cursor = &cursor[n..];
            used += n;
            let trimmed = cursor.trim_start();
            used += cursor.len() - trimmed.len();
            cursor = trimmed;
            match cursor.chars().next() {
                Some(',') => {
                    cursor = &cursor[1..];
                    used += 1;
                    if cursor.trim_start().starts_with('}') {
                        let t = cursor.trim_start();
                        used += cursor.len() - t.len() + 1;
                        return skipped + used;
                    }
                }
                Some('}') => return skipped + used + 1,
                _ => return skipped + used,
            }
        }
    }
    let ident_len = text_trimmed
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text_trimmed.len());
    let ident = &text_trimmed[..ident_len];
    let path = if prefix.is_empty() {
        ident.to_owned()
    } else {
        format!("{prefix}::{ident}")
    };
    let after = &text_trimmed[ident_len..];
    if let Some(next) = after.strip_prefix("::") {
        return skipped + ident_len + 2 + expand(next, path, out);
    }
    if !ident.is_empty() {
        out.push(path);
    }
    skipped + ident_len
}

/// The module a path points into: its longest prefix that is a module of the crate.
fn target_module(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|candidate| modules.contains(candidate))
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

/// Module -> modules it names, for one crate's `src/` (binaries under `src/bin` are their
/// own crates and are left out).
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.retain(|f| !f.starts_with(src.join("bin")));
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let from = module_of(src, file);
        let source = std::fs::read_to_string(file).unwrap();
        let targets: BTreeSet<String> = crate_paths(&source)
            .iter()
            .filter_map(|p| target_module(p, &modules))
            .filter(|to| to != &from)
            .collect();
        graph.insert(from, targets);
    }
    graph
}

#[test]
fn use_trees_are_expanded() {
    let source = "use crate::{a::b, c::{d::E, f}, g};\nlet x = crate::h::i(1);";
    assert_eq!(
        crate_paths(source),
        ["a::b", "c::d::E", "c::f", "g", "h::i"]
    );
    let modules: BTreeSet<String> = ["a", "c", "c::d"].map(String::from).into();
    assert_eq!(target_module("c::d::E", &modules).as_deref(), Some("c::d"));
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    graph.insert("c".to_owned(), BTreeSet::new());
    assert_eq!(find_cycle(&graph), None);
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for krate in CRATES {
        let src = workspace().join(krate).join("src");
        let graph = import_graph(&src);
        assert!(
            !graph.is_empty(),
            "{krate}: no sources found under {}",
            src.display()
        );
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{krate}: import cycle {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn no_source_file_is_longer_than_one_reader_holds() {
    let mut too_long = Vec::new();
    for krate in CRATES.iter().chain(&["kpsc-ebpf"]) {
        let mut files = Vec::new();
        rust_files(&workspace().join(krate), &mut files);
        for file in files {
            let lines = std::fs::read_to_string(&file).unwrap().lines().count();
            if lines > MAX_LINES {
                too_long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(too_long.is_empty(), "over {MAX_LINES} lines: {too_long:?}");
}
