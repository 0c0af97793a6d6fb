//! Paged list answers: every list request carries a [`PageRequest`] (`limit`, `after`), every
//! list answer a [`Page`] (`items`, `next`). A cursor is opaque to clients: the lowercase hex of
//! the last key the server looked at, so paging works over whatever key a list is ordered by.
//!
//! [`PageBuilder`] is the server's side, plain and I/O-free: fed the records of a range scan
//! from the cursor, it stops at the item limit, at a byte budget that keeps the answer well
//! under the 1 MiB frame cap, or after a bounded number of records scanned (a filtered list may
//! answer a short or even empty page with a `next`: the listing ends only when `next` is none).

use crate::codec;
use serde::{Deserialize, Serialize};

/// Items in a page when the request names no limit.
pub const DEFAULT_PAGE_ITEMS: u32 = 1000;
/// The most items a page may hold, whatever the request asks.
pub const MAX_PAGE_ITEMS: u32 = 10_000;
/// Encoded bytes of the items of one page. The decoder's limit counts what a message claims in
/// memory, up to 8 bytes per encoded byte (a one-byte varint claims its `u64`): an eighth of the
/// limit, less room for the answer around the items, always decodes on the other side.
pub const PAGE_BYTES: usize = codec::CONTROL_LIMIT / 8 - 8 * 1024;
/// Records a page may look at (filtered lists skip records): the server's work per page.
pub const MAX_SCAN: usize = 50_000;
/// Longest cursor accepted (hex characters): keys are short.
pub const MAX_CURSOR_CHARS: usize = 2048;

/// Which page of a list: at most `limit` items (default [`DEFAULT_PAGE_ITEMS`], capped at
/// [`MAX_PAGE_ITEMS`]) after the cursor `after` (none: from the start).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRequest {
    pub limit: Option<u32>,
    pub after: Option<String>,
}

impl PageRequest {
    /// The first page, default size.
    pub fn first() -> Self {
        Self::default()
    }

    /// The page after `cursor`, same limit.
    pub fn after(&self, cursor: String) -> Self {
        Self { limit: self.limit, after: Some(cursor) }
    }

    /// The item limit the server applies: the asked one within `1..=MAX_PAGE_ITEMS`.
    pub fn effective_limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_PAGE_ITEMS).clamp(1, MAX_PAGE_ITEMS) as usize
    }

    /// The raw key of the cursor, if any.
    pub fn after_key(&self) -> Result<Option<Vec<u8>>, CursorError> {
        self.after.as_deref().map(decode_cursor).transpose()
    }
}

/// One page of a list; `next` is the cursor of the following page, none at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// A whole (short) list as one last page.
    pub fn last(items: Vec<T>) -> Self {
        Self { items, next: None }
    }
}

/// Why a cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("cursor {0:?} is not one this coordinator handed out (expected hex digits)")]
    Malformed(String),
    #[error("cursor is longer than {MAX_CURSOR_CHARS} characters")]
    TooLong,
    #[error("cursor {0:?} does not belong to this list")]
    Foreign(String),
}

/// The cursor naming `key`.
pub fn encode_cursor(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key a cursor names.
pub fn decode_cursor(cursor: &str) -> Result<Vec<u8>, CursorError> {
    if cursor.len() > MAX_CURSOR_CHARS {
        return Err(CursorError::TooLong);
    }
    let bad = || CursorError::Malformed(cursor.to_owned());
    if !cursor.len().is_multiple_of(2) {
        return Err(bad());
    }
    cursor
        .as_bytes()
        .chunks_exact(2)
        .map(|pair| {
            let hex = std::str::from_utf8(pair).map_err(|_| bad())?;
            u8::from_str_radix(hex, 16).map_err(|_| bad())
        })
        .collect()
}

/// Builds one page from the records of a scan in key order, starting after the cursor.
#[derive(Debug)]
pub struct PageBuilder<T> {
    items: Vec<T>,
    limit: usize,
    bytes: usize,
    byte_budget: usize,
    scanned: usize,
    max_scan: usize,
    last_key: Option<Vec<u8>>,
    stopped: bool,
}

impl<T: Serialize> PageBuilder<T> {
    /// A page of the size `req` asks for, within the bounds of this module.
    pub fn new(req: &PageRequest) -> Self {
        Self::with_bounds(req.effective_limit(), PAGE_BYTES, MAX_SCAN)
    }

    /// A page with explicit bounds (tests, and lists that need a smaller byte budget).
    pub fn with_bounds(limit: usize, byte_budget: usize, max_scan: usize) -> Self {
        Self {
            items: Vec::new(),
            limit: limit.max(1),
            bytes: 0,
            byte_budget,
            scanned: 0,
            max_scan: max_scan.max(1),
            last_key: None,
            stopped: false,
        }
    }

    /// Offers the next record of the scan: `item` is none when a filter skipped it. Returns
    /// whether the scan should go on; once it returns false the page is complete and the
    /// record offered last is left for the next page (unless it was only counted as scanned).
    pub fn offer(&mut self, key: &[u8], item: Option<T>) -> bool {
        if self.stopped {
            return false;
        }
        if let Some(item) = item {
            if self.items.len() >= self.limit {
                self.stopped = true;
                return false;
            }
            // An item that does not encode counts as large: the answer's own encoding reports it.
            let size = codec::encode(&item).map_or(self.byte_budget, |b| b.len());
            if !self.items.is_empty() && self.bytes.saturating_add(size) > self.byte_budget {
                self.stopped = true;
                return false;
            }
            self.bytes = self.bytes.saturating_add(size);
            self.items.push(item);
        }
        self.last_key = Some(key.to_vec());
        self.scanned += 1;
        if self.scanned >= self.max_scan {
            self.stopped = true;
            return false;
        }
        true
    }

    /// Items so far.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The page: `next` is set when the scan stopped before the end of the list.
    pub fn finish(self) -> Page<T> {
        let next = match (self.stopped, self.last_key) {
            (true, Some(k)) => Some(encode_cursor(&k)),
            _ => None,
        };
        Page { items: self.items, next }
    }
}

/// Pages a list that is already in memory and sorted by `key` (a directory listing, a group's
/// members): the items after the cursor, as [`PageBuilder`] bounds them. A cursor that names no
/// item of the list is refused.
pub fn page_of_sorted<T: Serialize>(
    items: Vec<T>,
    key: impl Fn(&T) -> Vec<u8>,
    req: &PageRequest,
) -> Result<Page<T>, CursorError> {
    let start = match req.after_key()? {
        None => 0,
        Some(after) => match items.iter().position(|i| key(i) == after) {
            Some(at) => at + 1,
            None => return Err(CursorError::Foreign(req.after.clone().unwrap_or_default())),
        },
    };
    let mut page = PageBuilder::new(req);
    for item in items.into_iter().skip(start) {
        let k = key(&item);
        if !page.offer(&k, Some(item)) {
            break;
        }
    }
    Ok(page.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u32) -> [u8; 4] {
        n.to_be_bytes()
    }

    /// Pages through `0..n` (keeping those `keep` accepts) with the given bounds, as a client would.
    fn all_pages(n: u32, keep: impl Fn(u32) -> bool, limit: usize, budget: usize, scan: usize) -> (Vec<u32>, usize) {
        let mut after: Option<Vec<u8>> = None;
        let mut out = vec![];
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages <= 10 * n as usize + 10, "paging does not progress");
            let mut b = PageBuilder::with_bounds(limit, budget, scan);
            let start = after.as_ref().map_or(0, |k| u32::from_be_bytes([k[0], k[1], k[2], k[3]]) + 1);
            for i in start..n {
                if !b.offer(&key(i), keep(i).then_some(i)) {
                    break;
                }
            }
            let page = b.finish();
            out.extend(page.items);
            match page.next {
                Some(c) => after = Some(decode_cursor(&c).unwrap()),
                None => return (out, pages),
            }
        }
    }

    #[test]
    fn cursors_round_trip_any_key() {
        for k in [&b""[..], b"vm1", &[0, 255, 16, 1], "ünï".as_bytes()] {
            assert_eq!(decode_cursor(&encode_cursor(k)).unwrap(), k);
        }
    }

    #[test]
    fn malformed_and_overlong_cursors_are_refused() {
        assert!(matches!(decode_cursor("abc"), Err(CursorError::Malformed(_))));
        assert!(matches!(decode_cursor("zz"), Err(CursorError::Malformed(_))));
        assert!(matches!(decode_cursor("é1"), Err(CursorError::Malformed(_))));
        assert_eq!(decode_cursor(&"00".repeat(MAX_CURSOR_CHARS)), Err(CursorError::TooLong));
    }

    #[test]
    fn a_page_of_exactly_the_limit_at_the_end_has_no_next() {
        let mut b = PageBuilder::with_bounds(3, PAGE_BYTES, MAX_SCAN);
        for i in 0..3u32 {
            assert!(b.offer(&key(i), Some(i)));
        }
        let page = b.finish();
        assert_eq!((page.items, page.next), (vec![0, 1, 2], None));
    }

    #[test]
    fn a_full_page_points_at_its_last_item() {
        let mut b = PageBuilder::with_bounds(2, PAGE_BYTES, MAX_SCAN);
        assert!(b.offer(&key(0), Some(0u32)));
        assert!(b.offer(&key(1), Some(1)));
        assert!(!b.offer(&key(2), Some(2)));
        let page = b.finish();
        assert_eq!(page.items, vec![0, 1]);
        assert_eq!(page.next, Some(encode_cursor(&key(1))));
    }

    #[test]
    fn the_byte_budget_ends_a_page_but_never_an_empty_one() {
        let big = "x".repeat(100);
        let mut b = PageBuilder::with_bounds(1000, 150, MAX_SCAN);
        assert!(b.offer(&key(0), Some(big.clone())), "the first item always fits");
        assert!(!b.offer(&key(1), Some(big)));
        assert_eq!(b.finish().next, Some(encode_cursor(&key(0))));
    }

    #[test]
    fn a_filtered_scan_stops_after_its_bound_with_a_cursor() {
        let mut b = PageBuilder::<u32>::with_bounds(10, PAGE_BYTES, 5);
        for i in 0..4 {
            assert!(b.offer(&key(i), None));
        }
        assert!(!b.offer(&key(4), None));
        let page = b.finish();
        assert!(page.items.is_empty());
        assert_eq!(page.next, Some(encode_cursor(&key(4))), "the next page starts after what was scanned");
    }

    #[test]
    fn the_limit_is_clamped() {
        assert_eq!(PageRequest { limit: Some(0), after: None }.effective_limit(), 1);
        assert_eq!(PageRequest { limit: Some(u32::MAX), after: None }.effective_limit(), MAX_PAGE_ITEMS as usize);
        assert_eq!(PageRequest::first().effective_limit(), DEFAULT_PAGE_ITEMS as usize);
    }

    #[test]
    fn a_default_page_of_large_items_fits_a_frame() {
        // Job records with 4 KiB errors and details: the byte budget, not the count, ends the page.
        let item = ("e".repeat(4096), "d".repeat(4096), 7u64);
        let mut b = PageBuilder::new(&PageRequest::first());
        let mut i = 0u32;
        while b.offer(&key(i), Some(item.clone())) {
            i += 1;
        }
        let page = b.finish();
        assert!(page.next.is_some());
        let encoded = codec::encode(&page).unwrap();
        assert!(codec::decode::<Page<(String, String, u64)>>(&encoded).is_ok(), "{} bytes", encoded.len());
    }

    #[test]
    fn a_full_page_of_tiny_items_decodes_within_the_limit() {
        // Small integers are one byte on the wire and eight in the decoder's account.
        let mut b = PageBuilder::new(&PageRequest { limit: Some(MAX_PAGE_ITEMS), after: None });
        let mut i = 0u32;
        while b.offer(&key(i), Some((u64::from(i % 100), 1u64, Some(2u64), 3u32))) {
            i += 1;
        }
        let encoded = codec::encode(&b.finish()).unwrap();
        assert!(codec::decode::<Page<(u64, u64, Option<u64>, u32)>>(&encoded).is_ok(), "{} bytes", encoded.len());
    }

    #[test]
    fn sorted_lists_page_after_the_cursor_and_refuse_a_foreign_one() {
        let names: Vec<String> = (0..25).map(|i| format!("n{i:02}")).collect();
        let req = PageRequest { limit: Some(10), after: None };
        let first = page_of_sorted(names.clone(), |n| n.as_bytes().to_vec(), &req).unwrap();
        assert_eq!(first.items.first().map(String::as_str), Some("n00"));
        let second = page_of_sorted(names.clone(), |n| n.as_bytes().to_vec(), &req.after(first.next.unwrap())).unwrap();
        assert_eq!(second.items.first().map(String::as_str), Some("n10"));
        let foreign = req.after(encode_cursor(b"zz"));
        assert!(matches!(page_of_sorted(names, |n| n.as_bytes().to_vec(), &foreign), Err(CursorError::Foreign(_))));
    }

    proptest! {
        #[test]
        fn pages_chain_to_exactly_the_filtered_list(
            n in 0u32..300,
            modulus in 1u32..7,
            limit in 1usize..40,
            budget in 8usize..200,
            scan in 1usize..60,
        ) {
            let keep = |i: u32| i.is_multiple_of(modulus);
            let (got, _) = all_pages(n, keep, limit, budget, scan);
            let want: Vec<u32> = (0..n).filter(|&i| keep(i)).collect();
            prop_assert_eq!(got, want);
        }
    }
}
