//! Enums of event enums (with any serde tagging of their own), generics, upcasters as
//! functions and closures, fallible upcasters.
use eventcore::Event;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Event)]
enum Orders {
    Placed { order: String },
}

#[derive(Debug, Serialize, Deserialize, Event)]
enum Stock {
    Reserved { sku: String },
}

#[derive(Debug, Serialize, Deserialize, Event)]
#[serde(untagged)]
enum Shop {
    #[event(transparent)]
    Orders(Orders),
    #[event(transparent)]
    Stock(Stock),
}

#[derive(Debug, Serialize, Deserialize, Event)]
enum Recorded<T> {
    Value { value: T },
    #[event(transparent)]
    Other(Stock),
}

#[derive(Deserialize)]
struct PlacedV1 {
    id: String,
}

fn placed_v1(old: PlacedV1) -> Orders2 {
    Orders2::Placed { order: old.id }
}

fn strict_v1(old: serde_json::Value) -> Result<Orders2, String> {
    old["id"].as_str().map(|id| Orders2::Placed { order: id.to_owned() }).ok_or_else(|| "no id".to_owned())
}

#[derive(Debug, Serialize, Deserialize, Event)]
#[event(upcast(from = "Placed", with = placed_v1))]
#[event(upcast(from = "PlacedStrict", with = strict_v1))]
#[event(upcast(from = "PlacedRaw", with = |old: serde_json::Value| Orders2::Placed { order: old.to_string() }))]
enum Orders2 {
    #[event(name = "Placed.v2")]
    Placed { order: String },
}

fn main() {
    assert!(Shop::decodes("Placed") && Shop::decodes("Reserved") && !Shop::decodes("Nope"));
    assert_eq!(Recorded::<u8>::Value { value: 1 }.event_type(), "Value");
    assert!(Recorded::<String>::decodes("Reserved"));
    assert!(Orders2::decodes("Placed") && Orders2::decodes("PlacedRaw") && Orders2::decodes("Placed.v2"));
}
