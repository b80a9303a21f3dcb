//! In-memory storage: sparse 4 KiB pages, every write immediately durable.
//!
//! Clones share the same bytes, so a test can close an image and reopen it
//! from the same "disk".

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use super::{AllocRun, IoFuture, Storage, coalesce};
use crate::iobuf::IoBuf;

const PAGE: u64 = 4096;

#[derive(Default)]
struct Inner {
    pages: BTreeMap<u64, Box<[u8]>>,
    len: u64,
}

/// A sparse in-memory disk. Cheap to clone; clones share content.
#[derive(Clone, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<Inner>>,
    name: Arc<str>,
}

impl MemStorage {
    /// An empty storage of length 0 named `name` (used in messages).
    pub fn new(name: &str) -> Self {
        MemStorage {
            inner: Arc::default(),
            name: name.into(),
        }
    }

    /// A storage holding `data`.
    pub fn from_bytes(name: &str, data: &[u8]) -> Self {
        let s = Self::new(name);
        {
            let mut g = s.lock();
            g.len = data.len() as u64;
            write_bytes(&mut g, 0, data);
        }
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the whole content.
    pub fn to_vec(&self) -> Vec<u8> {
        let g = self.lock();
        let mut out = vec![0u8; g.len as usize];
        read_bytes(&g, 0, &mut out);
        out
    }

    /// Read synchronously (tests, fuzzing).
    pub fn read_sync(&self, offset: u64, buf: &mut [u8]) {
        read_bytes(&self.lock(), offset, buf);
    }

    /// Write synchronously (tests, fuzzing); grows the storage if needed.
    pub fn write_sync(&self, offset: u64, data: &[u8]) {
        let mut g = self.lock();
        g.len = g.len.max(offset + data.len() as u64);
        write_bytes(&mut g, offset, data);
    }
}

fn read_bytes(g: &Inner, offset: u64, buf: &mut [u8]) {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let page = pos / PAGE;
        let in_page = (pos % PAGE) as usize;
        let n = (PAGE as usize - in_page).min(buf.len() - done);
        match g.pages.get(&page) {
            Some(p) if pos < g.len => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
            _ => buf[done..done + n].fill(0),
        }
        done += n;
    }
}

fn write_bytes(g: &mut Inner, offset: u64, data: &[u8]) {
    let mut done = 0usize;
    while done < data.len() {
        let pos = offset + done as u64;
        let page = pos / PAGE;
        let in_page = (pos % PAGE) as usize;
        let n = (PAGE as usize - in_page).min(data.len() - done);
        let p = g
            .pages
            .entry(page)
            .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
        p[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
        done += n;
    }
}

fn zero_range(g: &mut Inner, offset: u64, len: u64, dealloc: bool) {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let page = pos / PAGE;
        let in_page = pos % PAGE;
        let n = (PAGE - in_page).min(end - pos);
        if in_page == 0 && n == PAGE && dealloc {
            g.pages.remove(&page);
        } else if let Some(p) = g.pages.get_mut(&page) {
            p[in_page as usize..(in_page + n) as usize].fill(0);
        } else if !dealloc {
            let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
            p.fill(0);
            g.pages.insert(page, p);
        }
        pos += n;
    }
}

impl Storage for MemStorage {
    fn read_at(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        read_bytes(&self.lock(), offset, &mut buf);
        Box::pin(std::future::ready(Ok(buf)))
    }

    fn write_at(&self, offset: u64, buf: IoBuf, _fua: bool) -> IoFuture<'_, IoBuf> {
        {
            let mut g = self.lock();
            g.len = g.len.max(offset + buf.len() as u64);
            write_bytes(&mut g, offset, &buf);
        }
        Box::pin(std::future::ready(Ok(buf)))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        zero_range(&mut self.lock(), offset, len, true);
        Box::pin(std::future::ready(Ok(())))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        zero_range(&mut self.lock(), offset, len, false);
        Box::pin(std::future::ready(Ok(())))
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len)
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        let mut g = self.lock();
        if len < g.len {
            let first_dead = len.div_ceil(PAGE);
            g.pages.retain(|&p, _| p < first_dead);
            if !len.is_multiple_of(PAGE)
                && let Some(p) = g.pages.get_mut(&(len / PAGE))
            {
                p[(len % PAGE) as usize..].fill(0);
            }
        }
        g.len = len;
        Box::pin(std::future::ready(Ok(())))
    }

    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        let g = self.lock();
        let end = offset + len;
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let n = (PAGE - pos % PAGE).min(end - pos);
            let data = pos < g.len && g.pages.contains_key(&page);
            runs.push(AllocRun { length: n, data });
            pos += n;
        }
        Box::pin(std::future::ready(Ok(coalesce(runs))))
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.lock().pages.len() as u64 * PAGE)
    }

    fn describe(&self) -> String {
        format!("memory:{}", self.name)
    }
}
