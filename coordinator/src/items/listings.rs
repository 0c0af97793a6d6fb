//! Sorted directory listings the coordinator keeps for a while, so that paging through a large
//! directory (`ls --after CURSOR`, page after page) starts an items worker and reads the guest
//! once, not once per page: each later page is a binary search and a copy of `limit` items. A
//! recovery point never changes, so a listing never goes stale; the cache is bounded in bytes
//! ([`CACHE_BYTES`]) and in listings, and forgets the least recently used first. A directory
//! larger than one listing may be ([`MAX_ITEMS`], [`MAX_LISTING_BYTES`]) is remembered as such and
//! paged by the worker one page at a time. What is kept is what the worker answered, checked to
//! be sorted: never guest bytes.

use super::{Item, ListPage};
use crate::catalog::RpDisk;
use bulwark_protocol::blockmap::TreeRoot;
use std::collections::VecDeque;
use std::sync::{Arc, LazyLock, Mutex};

/// Bytes of listings kept, all told (an estimate: names, paths, targets and 64 bytes an item).
pub const CACHE_BYTES: usize = 64 << 20;
/// Listings kept at most.
pub const MAX_LISTINGS: usize = 64;
/// Entries of the largest directory kept whole.
pub const MAX_ITEMS: u32 = 100_000;
/// Bytes of the largest listing kept whole.
pub const MAX_LISTING_BYTES: usize = 32 << 20;

/// Which directory: the disk's content (its frozen root and shape) and the path in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    root: TreeRoot,
    block_size: u32,
    size: u64,
    path: String,
}

impl Key {
    pub fn new(d: &RpDisk, path: &str) -> Self {
        let path = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect::<Vec<_>>().join("/");
        Key { root: d.root, block_size: d.block_size, size: d.size_bytes, path }
    }
}

/// The estimated memory of an item.
pub fn item_bytes(i: &Item) -> usize {
    i.path.len() + i.name.len() + i.target.as_ref().map_or(0, Vec::len) + 64
}

/// A directory's entries after `from` (all of them when `from` is none), sorted by raw name.
#[derive(Debug)]
pub struct Listing {
    from: Option<Vec<u8>>,
    items: Vec<Item>,
    bytes: usize,
}

impl Listing {
    /// Refuses items that are not strictly sorted after `from` (the worker is not trusted).
    pub fn new(from: Option<Vec<u8>>, items: Vec<Item>) -> Result<Self, String> {
        let sorted = items.windows(2).all(|w| w[0].name < w[1].name)
            && items.first().is_none_or(|i| from.as_ref().is_none_or(|f| i.name > *f));
        if !sorted {
            return Err("the items worker answered a listing out of order".into());
        }
        let bytes = items.iter().map(item_bytes).sum();
        Ok(Listing { from, items, bytes })
    }

    /// The page of at most `limit` items after `after`, when this listing holds it.
    pub fn page(&self, after: Option<&[u8]>, limit: usize) -> Option<ListPage> {
        let covered = match (&self.from, after) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(f), Some(a)) => f.as_slice() <= a,
        };
        if !covered {
            return None;
        }
        let start = after.map_or(0, |a| self.items.partition_point(|i| i.name.as_slice() <= a));
        let end = start.saturating_add(limit.max(1)).min(self.items.len());
        let items = self.items[start..end].to_vec();
        let next = if end < self.items.len() { items.last().map(|i| i.name.clone()) } else { None };
        Some(ListPage { items, next })
    }
}

/// What is known of a directory.
#[derive(Debug, Clone)]
pub enum Known {
    Listing(Arc<Listing>),
    /// Larger than a listing may be: paged by the worker.
    TooLarge,
}

struct Cache {
    /// Most recently used first.
    entries: VecDeque<(Key, Known)>,
    bytes: usize,
}

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(|| Mutex::new(Cache { entries: VecDeque::new(), bytes: 0 }));

fn known_bytes(k: &Known) -> usize {
    match k {
        Known::Listing(l) => l.bytes,
        Known::TooLarge => 0,
    }
}

/// What the cache knows of `key` (and it is now the most recently used).
pub fn get(key: &Key) -> Option<Known> {
    let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let at = c.entries.iter().position(|(k, _)| k == key)?;
    let hit = c.entries.remove(at)?;
    let known = hit.1.clone();
    c.entries.push_front(hit);
    Some(known)
}

/// Remembers `known` for `key`, forgetting the least recently used to stay within bounds.
pub fn put(key: Key, known: Known) {
    if known_bytes(&known) > MAX_LISTING_BYTES {
        return;
    }
    let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(at) = c.entries.iter().position(|(k, _)| *k == key) {
        if let Some((_, old)) = c.entries.remove(at) {
            c.bytes -= known_bytes(&old);
        }
    }
    c.bytes += known_bytes(&known);
    c.entries.push_front((key, known));
    while c.bytes > CACHE_BYTES || c.entries.len() > MAX_LISTINGS {
        let Some((_, old)) = c.entries.pop_back() else { break };
        c.bytes -= known_bytes(&old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::items::ItemKind;

    fn item(name: &str) -> Item {
        Item {
            path: format!("/d/{name}"),
            name: name.as_bytes().to_vec(),
            kind: ItemKind::File,
            size: 1,
            mtime: 0,
            mode: 0o644,
            target: None,
        }
    }

    fn names(p: &ListPage) -> Vec<String> {
        p.items.iter().map(|i| String::from_utf8_lossy(&i.name).into_owned()).collect()
    }

    #[test]
    fn pages_of_a_listing_follow_the_cursor_and_end_with_no_next() {
        let l = Listing::new(None, ["a", "b", "c", "d", "e"].map(item).to_vec()).unwrap();
        let p = l.page(None, 2).unwrap();
        assert_eq!((names(&p), p.next.clone()), (vec!["a".into(), "b".into()], Some(b"b".to_vec())));
        let p = l.page(Some(b"b"), 2).unwrap();
        assert_eq!(names(&p), vec!["c", "d"]);
        let p = l.page(Some(b"d"), 2).unwrap();
        assert_eq!((names(&p), p.next), (vec!["e".into()], None));
        // A cursor between names (an entry that is not there) continues after it.
        assert_eq!(names(&l.page(Some(b"bb"), 10).unwrap()), vec!["c", "d", "e"]);
        assert!(l.page(Some(b"z"), 10).unwrap().items.is_empty());
    }

    #[test]
    fn a_listing_from_a_cursor_answers_only_pages_after_it_and_disorder_is_refused() {
        let l = Listing::new(Some(b"b".to_vec()), ["c", "d"].map(item).to_vec()).unwrap();
        assert!(l.page(None, 10).is_none());
        assert!(l.page(Some(b"a"), 10).is_none());
        assert_eq!(names(&l.page(Some(b"c"), 10).unwrap()), vec!["d"]);
        assert!(Listing::new(None, ["b", "a"].map(item).to_vec()).is_err());
        assert!(Listing::new(None, ["a", "a"].map(item).to_vec()).is_err());
        assert!(Listing::new(Some(b"c".to_vec()), ["b"].map(item).to_vec()).is_err());
    }

    #[test]
    fn the_cache_stays_within_its_listing_count() {
        let d = |n: u8| RpDisk {
            name: "os".into(),
            size_bytes: 1 << 20,
            block_size: 4096,
            root: TreeRoot { digest: [n; 32], levels: 1, blocks: 256 },
        };
        for n in 0..(MAX_LISTINGS + 10) as u8 {
            put(Key::new(&d(n), "/x"), Known::Listing(Arc::new(Listing::new(None, vec![item("a")]).unwrap())));
        }
        assert!(get(&Key::new(&d(0), "/x")).is_none(), "the oldest is forgotten");
        let last = (MAX_LISTINGS + 9) as u8;
        assert!(matches!(get(&Key::new(&d(last), "x/")), Some(Known::Listing(_))), "paths are normalized");
        let c = CACHE.lock().unwrap();
        assert!(c.entries.len() <= MAX_LISTINGS && c.bytes <= CACHE_BYTES);
    }
}
