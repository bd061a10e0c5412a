//! The crate's layering, checked from its source: every path a file uses
//! (`crate::`, `super::`, `self::` or a child module's name) points to a
//! module of a lower layer, or to another file of its own layer without
//! closing a cycle. A folder's `mod.rs` is the interface of its own files, so
//! edges between the two are not counted; every other edge is. A new import
//! that points up, or a file-level cycle, fails the build here with the files
//! named.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use petgraph::{algo::tarjan_scc, graphmap::DiGraphMap};
use syn::visit::Visit;

/// Top-level modules, lowest layer first. Modules of one layer may use each
/// other (file cycles aside); a module uses only its own and lower layers.
const LAYERS: &[&[&str]] = &[
    &["domain"],
    &["sys"],
    &["config", "kernel"],
    // The shared state holds the fleet view that queries read.
    &["counting", "cluster"],
    &["serving"],
    &["adapters", "metrics"],
    &["agent"],
    // The binary's command line, on top of everything.
    &["cli"],
];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("top-level module `{module}` is in no layer of tests/layers.rs"))
}

/// A source file and its module path (`["serving", "protocol", "cidr"]`).
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
}

fn source_files(src: &Path) -> Vec<SourceFile> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read src dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let mut module: Vec<String> = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match module.last().map(String::as_str) {
                Some("mod") => {
                    module.pop();
                }
                // The crate root and the binary are not part of the layers.
                Some("lib" | "main") if module.len() == 1 => continue,
                _ => {}
            }
            out.push(SourceFile { path, module });
        }
    }
    out.sort_by(|a, b| a.module.cmp(&b.module));
    out
}

/// Every path in `use` items and in code; [`target`] keeps those that land
/// in one of our files.
#[derive(Default)]
struct Paths(Vec<Vec<String>>);

impl Paths {
    fn tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.push(prefix, Some(n.ident.to_string())),
            syn::UseTree::Rename(r) => self.push(prefix, Some(r.ident.to_string())),
            syn::UseTree::Glob(_) => self.push(prefix, None),
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.tree(prefix, item);
                }
            }
        }
    }

    fn push(&mut self, prefix: &[String], last: Option<String>) {
        let mut path = prefix.to_vec();
        path.extend(last);
        // Also relative paths (`use node::run` names a child module); those
        // that name no module of ours (std, other crates) resolve to nothing.
        if !path.is_empty() {
            self.0.push(path);
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.push(&segments, None);
        syn::visit::visit_path(self, path);
    }

    // `mod tests { use super::*; }` refers to its own file.
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if item.content.is_none() {
            return;
        }
        let mut inner = Paths::default();
        for nested in item.content.iter().flat_map(|(_, items)| items) {
            inner.visit_item(nested);
        }
        for path in inner.0 {
            if path.first().map(String::as_str) == Some("super") {
                let mut path = path;
                path.remove(0);
                path.insert(0, "self".into());
                self.0.push(path);
            } else {
                self.0.push(path);
            }
        }
    }
}

/// The file a path lands in: the longest module path that is a file.
fn target(from: &[String], path: &[String], files: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    let mut resolved: Vec<String> = Vec::new();
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => rest = &rest[1..],
        Some("self") => {
            resolved = from.to_vec();
            rest = &rest[1..];
        }
        Some("super") => {
            resolved = from.to_vec();
            while rest.first().map(String::as_str) == Some("super") {
                resolved.pop();
                rest = &rest[1..];
            }
        }
        _ => {
            // Relative to this file's module: only a child module counts.
            let mut child = from.to_vec();
            child.extend(rest.iter().cloned());
            return (from.len() + 1..=child.len())
                .rev()
                .map(|n| child[..n].to_vec())
                .find(|candidate| files.contains(candidate));
        }
    }
    resolved.extend(rest.iter().cloned());
    (1..=resolved.len())
        .rev()
        .map(|n| resolved[..n].to_vec())
        .find(|candidate| files.contains(candidate))
}

#[test]
fn every_import_points_down_and_no_file_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = source_files(&src);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let mut edges: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in &files {
        let text = fs::read_to_string(&file.path).expect("read source");
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.path.display()));
        let mut paths = Paths::default();
        paths.visit_file(&ast);
        for path in &paths.0 {
            let Some(to) = target(&file.module, path, &modules) else {
                continue;
            };
            if to == file.module {
                continue;
            }
            // A folder's mod.rs is the interface of the files in it: it
            // re-exports them and they use what it defines. Edges between a
            // mod.rs and its own files are not counted; every other edge is.
            let parent_of = |a: &[String], b: &[String]| a.len() + 1 == b.len() && b.starts_with(a);
            if parent_of(&to, &file.module) || parent_of(&file.module, &to) {
                continue;
            }
            let (from_layer, to_layer) = (layer_of(&file.module[0]), layer_of(&to[0]));
            if to_layer > from_layer {
                upward.push(format!(
                    "{} uses {}",
                    file.module.join("::"),
                    path.join("::")
                ));
            }
            edges.insert((file.module.join("::"), to.join("::")), path.join("::"));
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point to a higher layer:\n{}",
        upward.join("\n")
    );

    let mut graph = DiGraphMap::<&str, ()>::new();
    for (from, to) in edges.keys() {
        graph.add_edge(from.as_str(), to.as_str(), ());
    }
    let cycles: Vec<String> = tarjan_scc(&graph)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .map(|scc| {
            let members: BTreeSet<&str> = scc.iter().copied().collect();
            let lines: Vec<String> = edges
                .iter()
                .filter(|((f, t), _)| members.contains(f.as_str()) && members.contains(t.as_str()))
                .map(|((f, _), path)| format!("  {f} uses {path}"))
                .collect();
            lines.join("\n")
        })
        .collect();
    assert!(
        cycles.is_empty(),
        "file-level import cycles:\n{}",
        cycles.join("\n\n")
    );
    // The check must have seen the crate: a broken walk would pass vacuously.
    assert!(
        files.len() > 20 && edges.len() > 30,
        "{} files, {} edges",
        files.len(),
        edges.len()
    );
}
