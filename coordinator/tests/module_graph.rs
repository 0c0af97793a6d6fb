//! One direction of dependencies between the coordinator's modules: the top-level modules'
//! `crate::` references (outside test code) form no cycle, so each layer can be read, tested
//! and reused (by the deterministic simulation) without the ones above it. The same check as
//! `cargo modules dependencies --no-externs` would show, with nothing to install.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The source of a file without its test code (`#[cfg(test)]` items run to the end of the file
/// in this code base; `tests.rs` files are test code whole).
fn without_tests(path: &Path) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let src = std::fs::read_to_string(path).unwrap();
    match src.find("#[cfg(test)]") {
        Some(i) => src[..i].to_owned(),
        None => src,
    }
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module → the top-level modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    walk(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
        if top == "lib" || top == "main" || top == "bin" {
            continue;
        }
        let text = without_tests(&f);
        let deps = g.entry(top.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
        // `use crate::{a, b::c}` groups.
        for (i, _) in text.match_indices("crate::{") {
            let group: String = text[i + 8..].chars().take_while(|c| *c != '}').collect();
            for part in group.split(',') {
                let name: String = part.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != top {
                    deps.insert(name);
                }
            }
        }
    }
    g
}

/// A cycle through `start`, if any (depth-first).
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(g, n, &mut vec![], &mut done))
}

#[test]
fn the_coordinators_modules_depend_on_each_other_in_one_direction() {
    let g = graph();
    for layer in ["catalog", "store", "jobs", "server", "items", "config"] {
        assert!(g.contains_key(layer), "no module {layer}: the check reads the wrong tree ({g:?})");
    }
    assert!(g["server"].contains("jobs"), "the check sees references: {g:?}");
    if let Some(c) = cycle(&g) {
        panic!("a dependency cycle between the coordinator's modules: {}\n{g:#?}", c.join(" → "));
    }
    // The layers named in docs/architecture.md, lowest first.
    for (low, high) in [("catalog", "store"), ("store", "jobs"), ("jobs", "server"), ("config", "jobs")] {
        assert!(!g[low].contains(high), "{low} reaches up to {high}");
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let g: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .map(|(x, y)| (x.to_owned(), BTreeSet::from([y.to_owned()])))
        .collect();
    assert_eq!(cycle(&g).map(|c| c.len()), Some(4));
    let acyclic: BTreeMap<String, BTreeSet<String>> =
        [("a", "b"), ("b", "c")].into_iter().map(|(x, y)| (x.to_owned(), BTreeSet::from([y.to_owned()]))).collect();
    assert_eq!(cycle(&acyclic), None);
}
