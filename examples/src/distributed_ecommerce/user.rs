//! The User service: owns `user-<id>`. Registers users, and publishes `UserRegistered`
//! on `user-events` for whoever needs to know (the Order service keeps customer profiles
//! from it).

use eventcore::{
    Command, CommandLogic, CommandResult, ReadStreams, StoredEvent, StreamId, StreamResolver,
    StreamWrite, require,
};

use super::contracts::{UserEvent, user_stream};
use super::order::check_id;

/// Registers a user; registering the same user again changes nothing.
#[derive(Debug, Clone, Command)]
pub struct RegisterUser {
    /// `user-<id>`.
    #[stream]
    pub user: StreamId,
    /// The user id.
    pub user_id: String,
    /// Their name.
    pub name: String,
    /// Their e-mail address.
    pub email: String,
}

impl RegisterUser {
    /// User `user_id`, called `name`, reachable at `email`.
    pub fn new(user_id: &str, name: &str, email: &str) -> eventcore::Result<Self> {
        check_id("user id", user_id)?;
        Ok(RegisterUser {
            user: user_stream(user_id)?,
            user_id: user_id.to_owned(),
            name: name.to_owned(),
            email: email.to_owned(),
        })
    }
}

impl CommandLogic for RegisterUser {
    type State = bool;
    type Event = UserEvent;

    fn apply(&self, registered: &mut bool, _: &StoredEvent<UserEvent>) {
        *registered = true;
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        registered: bool,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, UserEvent>>> {
        if registered {
            return Ok(Vec::new());
        }
        require!(
            self.email.contains('@'),
            "{:?} is not an e-mail address",
            self.email
        );
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.user.clone(),
            UserEvent::UserRegistered {
                user_id: self.user_id.clone(),
                name: self.name.clone(),
                email: self.email.clone(),
            },
        )?])
    }
}
