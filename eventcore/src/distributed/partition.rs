//! Partitions of a subscription: the source streams split into parts that are handled
//! at the same time, each part in order.

use crate::names::StreamId;

/// How many slots every publication's source streams are spread over. A stream's slot
/// ([`slot_of`]) is fixed forever; a subscription split into `count` partitions gives
/// partition `i` the slots `s` with `s % count == i`, which is why `count` divides it.
pub const SLOTS: u32 = 64;

/// The slot of `stream`, in `0..SLOTS`: the low six bits of the 64-bit FNV-1a hash of
/// its UTF-8 bytes, mixed by MurmurHash3's 64-bit finaliser. Part of the wire format
/// (brokers may put it in the subject), so it never changes.
pub fn slot_of(stream: &StreamId) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for &byte in stream.as_str().as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    // FNV's low bits mix poorly on short, similar ids ("account-1", "account-2"):
    // finalise so that every bit depends on every input bit.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    // Truncation intended: the low bits, below SLOTS.
    (hash % u64::from(SLOTS)) as u32
}

/// A partition count or index this crate refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidPartition {
    /// The count is not a power of two from 1 to [`SLOTS`] (a divisor of it).
    #[error("a subscription is split into 1, 2, 4, 8, 16, 32 or 64 partitions, not {0}")]
    Count(u32),
    /// The index is not below the count.
    #[error("partition {index} of {count} does not exist (they are numbered from 0)")]
    Index {
        /// The index asked for.
        index: u32,
        /// The count.
        count: u32,
    },
}

/// One part of a subscription split `count` ways ([`crate::distributed::SubscriptionSpec::split`]):
/// it receives the events of the source streams whose [`slot_of`] is `index` modulo
/// `count`, and nothing else. Every source stream belongs to exactly one partition, so
/// each stream's events stay in order while the partitions are handled at once.
///
/// At the broker, each partition is its own durable subscription with its own position
/// and its own one event in flight; the partitions of one subscription share its name
/// (hence its idempotency keys and its inbox). A subscription is split one way for its
/// whole life: the transports refuse a partition of another count while the
/// subscription exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    index: u32,
    count: u32,
}

impl Partition {
    /// The whole subscription, not split: every source stream.
    pub const WHOLE: Partition = Partition { index: 0, count: 1 };

    /// Partition `index` of `count`.
    ///
    /// # Errors
    ///
    /// [`InvalidPartition::Count`] unless `count` is a power of two up to [`SLOTS`];
    /// [`InvalidPartition::Index`] unless `index < count`.
    pub fn new(index: u32, count: u32) -> Result<Self, InvalidPartition> {
        if count == 0 || !count.is_power_of_two() || count > SLOTS {
            return Err(InvalidPartition::Count(count));
        }
        if index >= count {
            return Err(InvalidPartition::Index { index, count });
        }
        Ok(Partition { index, count })
    }

    /// Every partition of a subscription split `count` ways, in index order.
    ///
    /// # Errors
    ///
    /// [`InvalidPartition::Count`] unless `count` is a power of two up to [`SLOTS`].
    pub fn all(count: u32) -> Result<Vec<Partition>, InvalidPartition> {
        (0..count.max(1))
            .map(|index| Partition::new(index, count))
            .collect()
    }

    /// The index, from 0.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How many partitions the subscription is split into.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether this is [`Partition::WHOLE`].
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// Whether `stream`'s events belong to this partition.
    pub fn contains(&self, stream: &StreamId) -> bool {
        self.holds_slot(slot_of(stream))
    }

    /// Whether slot `slot` belongs to this partition.
    pub fn holds_slot(&self, slot: u32) -> bool {
        slot % self.count == self.index
    }

    /// The slots of this partition, increasing.
    pub fn slots(&self) -> impl Iterator<Item = u32> + use<> {
        let (index, count) = (self.index, self.count);
        (index..SLOTS).step_by(count as usize)
    }
}

impl Default for Partition {
    fn default() -> Self {
        Partition::WHOLE
    }
}

impl std::fmt::Display for Partition {
    /// `2/8` for partition 2 of 8; `whole` for [`Partition::WHOLE`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_whole() {
            f.write_str("whole")
        } else {
            write!(f, "{}/{}", self.index, self.count)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: &str) -> StreamId {
        StreamId::try_new(id).expect("valid")
    }

    #[test]
    fn slots_are_fixed_forever() {
        // The wire format: a change here re-partitions every deployment.
        let slots: Vec<u32> = ["a", "account-1", "account-2", "orders/42", "été"]
            .iter()
            .map(|id| slot_of(&stream(id)))
            .collect();
        // (Computed independently of this code, from the definition on `slot_of`.)
        assert_eq!(slots, [27, 7, 53, 47, 59]);
    }

    #[test]
    fn similar_ids_spread_over_every_slot() {
        let mut counts = [0_u32; SLOTS as usize];
        for n in 0..6_400 {
            counts[slot_of(&stream(&format!("account-{n}"))) as usize] += 1;
        }
        // 100 expected per slot; a fair hash keeps every slot within half of it.
        assert!(counts.iter().all(|c| (50..=150).contains(c)), "{counts:?}");
    }

    #[test]
    fn the_partitions_of_a_count_split_the_slots_exactly() {
        for count in [1, 2, 4, 8, 16, 32, 64] {
            let partitions = Partition::all(count).expect("valid");
            assert_eq!(partitions.len(), count as usize);
            let mut slots: Vec<u32> = partitions.iter().flat_map(|p| p.slots()).collect();
            slots.sort_unstable();
            assert_eq!(slots, (0..SLOTS).collect::<Vec<_>>(), "count {count}");
            for partition in &partitions {
                assert!(partition.slots().all(|s| partition.holds_slot(s)));
            }
            let id = stream("orders/42");
            assert_eq!(partitions.iter().filter(|p| p.contains(&id)).count(), 1);
        }
    }

    #[test]
    fn counts_and_indexes_outside_the_slots_are_refused() {
        for count in [0, 3, 6, 65, 128, u32::MAX] {
            assert_eq!(
                Partition::new(0, count),
                Err(InvalidPartition::Count(count))
            );
            assert_eq!(Partition::all(count), Err(InvalidPartition::Count(count)));
        }
        assert_eq!(
            Partition::new(4, 4),
            Err(InvalidPartition::Index { index: 4, count: 4 })
        );
        assert_eq!(Partition::new(0, 1), Ok(Partition::WHOLE));
        assert_eq!(Partition::new(2, 8).expect("valid").to_string(), "2/8");
        assert_eq!(Partition::WHOLE.to_string(), "whole");
    }
}
