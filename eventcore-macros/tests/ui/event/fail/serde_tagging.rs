use eventcore::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[serde(tag = "type")]
enum Tagged {
    Opened { owner: String },
}

#[derive(Serialize, Deserialize, Event)]
#[serde(untagged)]
enum Untagged {
    Opened { owner: String },
}

#[derive(Serialize, Deserialize, Event)]
enum Skipping {
    #[serde(skip)]
    Hidden,
    #[serde(skip_deserializing)]
    WriteOnly,
    #[serde(with = "custom")]
    Custom(u8),
    Shown,
}

mod custom {
    pub fn serialize<S: serde::Serializer>(v: &u8, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(*v)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
        serde::Deserialize::deserialize(d)
    }
}

fn main() {}

#[derive(Clone, Serialize, Deserialize)]
enum Wire {
    B(u32),
    A(u32),
}

impl From<Wire> for Replaced {
    fn from(_: Wire) -> Self {
        Replaced::A(0)
    }
}

impl From<Replaced> for Wire {
    fn from(_: Replaced) -> Self {
        Wire::A(0)
    }
}

// Another type's serde impls: the variant positions mean nothing to them.
#[derive(Clone, Serialize, Deserialize, Event)]
#[serde(from = "Wire", into = "Wire")]
enum Replaced {
    A(u32),
    B(u32),
}

// Whole payloads keep serde's tag, so any tagging works but none at all.
#[derive(Serialize, Deserialize, Event)]
#[event(payload = "whole")]
#[serde(untagged)]
enum Ambiguous {
    A { x: u32 },
    B { x: u32 },
}
