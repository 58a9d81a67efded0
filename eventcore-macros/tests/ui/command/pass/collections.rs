use std::collections::BTreeSet;

use eventcore::{
    Command, CommandLogic, CommandResult, CommandStreams, ReadStreams, StoredEvent, StreamId,
    StreamResolver, StreamWrite,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Reserved;

impl eventcore::Event for Reserved {
    fn event_type(&self) -> &'static str {
        "Reserved"
    }
}

#[derive(Command)]
struct ReserveAll {
    #[stream]
    order: StreamId,
    #[stream]
    products: Vec<StreamId>,
    #[stream]
    coupon: Option<StreamId>,
    #[stream]
    warehouses: BTreeSet<StreamId>,
    #[stream]
    pair: [StreamId; 2],
}

impl CommandLogic for ReserveAll {
    type State = ();
    type Event = Reserved;

    fn apply(&self, _state: &mut (), _event: &StoredEvent<Reserved>) {}

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        _state: (),
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Reserved>>> {
        self.products
            .iter()
            .map(|p| StreamWrite::new(&read_streams, p.clone(), Reserved))
            .collect()
    }
}

fn main() {
    let id = StreamId::from_static;
    let command = ReserveAll {
        order: id("order-1"),
        products: vec![id("product-1"), id("product-2")],
        coupon: None,
        warehouses: [id("wh-1")].into_iter().collect(),
        pair: [id("x"), id("y")],
    };
    assert_eq!(
        command.read_streams(),
        vec![
            id("order-1"),
            id("product-1"),
            id("product-2"),
            id("wh-1"),
            id("x"),
            id("y")
        ]
    );
}
