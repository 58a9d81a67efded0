//! Storage that grows without moving what it holds: appends never copy earlier events,
//! so no append stalls behind a reallocation of millions of them while holding a lock.

use std::collections::HashMap;

use eventcore::EventId;

/// Elements per chunk.
const CHUNK: usize = 4_096;

/// A vector stored in fixed-size chunks: pushing allocates a new chunk when the last is
/// full and never moves the elements already stored.
#[derive(Debug)]
pub(crate) struct ChunkedVec<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for ChunkedVec<T> {
    fn default() -> Self {
        ChunkedVec {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> ChunkedVec<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(value),
            // The first chunk grows as a vector does (most streams are short, and a full
            // chunk each would cost them hundreds of kilobytes); the next ones are
            // allocated whole. Either way at most one chunk's elements are ever moved.
            None => self.chunks.push(vec![value]),
            Some(_) => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(value);
                self.chunks.push(chunk);
            }
        }
        self.len += 1;
    }

    pub(crate) fn get(&self, index: usize) -> Option<&T> {
        self.chunks.get(index / CHUNK)?.get(index % CHUNK)
    }

    /// The elements from `start` on (none past the end).
    pub(crate) fn iter_from(&self, start: usize) -> impl Iterator<Item = &T> {
        let first = start / CHUNK;
        let skip = start % CHUNK;
        self.chunks
            .iter()
            .skip(first)
            .enumerate()
            .flat_map(move |(i, chunk)| chunk.iter().skip(if i == 0 { skip } else { 0 }))
    }
}

/// Shards of the event-id index.
const SHARDS: usize = 256;

/// Where each stored event id is, split over many small maps so that growing one
/// rehashes a 256th of the ids, not all of them at once.
#[derive(Debug)]
pub(crate) struct IdIndex {
    shards: Vec<HashMap<EventId, usize>>,
}

impl Default for IdIndex {
    fn default() -> Self {
        IdIndex {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
        }
    }
}

impl IdIndex {
    fn shard(id: &EventId) -> usize {
        // The last bytes of a UUID (v7: random; v4: random) spread ids evenly.
        usize::from(id.as_uuid().as_bytes()[15]) % SHARDS
    }

    pub(crate) fn get(&self, id: &EventId) -> Option<usize> {
        self.shards[Self::shard(id)].get(id).copied()
    }

    pub(crate) fn insert(&mut self, id: EventId, index: usize) {
        self.shards[Self::shard(&id)].insert(id, index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_vec_keeps_order_across_chunks_and_iterates_from_any_index() {
        let mut values = ChunkedVec::default();
        for n in 0..(CHUNK * 2 + 10) {
            values.push(n);
        }
        assert_eq!(values.len(), CHUNK * 2 + 10);
        assert_eq!(values.get(CHUNK), Some(&CHUNK));
        assert_eq!(values.get(CHUNK * 2 + 10), None);
        for start in [
            0,
            1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            CHUNK * 2 + 9,
            CHUNK * 2 + 10,
            usize::MAX,
        ] {
            let expected: Vec<usize> = (start.min(CHUNK * 2 + 10)..CHUNK * 2 + 10).collect();
            let got: Vec<usize> = values.iter_from(start).copied().collect();
            assert_eq!(got, expected, "from {start}");
        }
    }

    #[test]
    fn id_index_finds_what_it_holds() {
        let mut index = IdIndex::default();
        let ids: Vec<EventId> = (0..2_000).map(|_| EventId::new()).collect();
        for (n, id) in ids.iter().enumerate() {
            index.insert(*id, n);
        }
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(index.get(id), Some(n));
        }
        assert_eq!(index.get(&EventId::new()), None);
    }
}
