//! Driving the core's broker requests (broker mode): the I/O half of
//! `switchboard_core`'s cluster support.
//!
//! Membership changes (room and user subscriptions, presence) go through one
//! ordered queue, fed under the core's lock in the order the core decided
//! them, so an unsubscribe can never overtake the subscribe it follows. The
//! rest (publishes, join lookups, directs, presence lists) run in the task
//! that caused them: a session's frames are answered in order.

use std::collections::VecDeque;
use std::sync::Arc;

use base64::Engine as _;
use switchboard_core::{BrokerRequest, Channel, ErrorCode, PresenceNote, RoomName};
use tokio::sync::{mpsc, oneshot};

use crate::broker::{Broker, BrokerError, BrokerEvent, PublishRequest};
use crate::switchboard::Shared;

/// A membership change for the ordered queue.
pub(crate) enum MembershipOp {
    Subscribe(Channel, Option<oneshot::Sender<Result<(), BrokerError>>>),
    Unsubscribe(Channel),
    Presence {
        room: RoomName,
        note: PresenceNote,
        joined: bool,
        done: Option<oneshot::Sender<Result<(), BrokerError>>>,
    },
}

/// A broker request still to perform, after the membership changes it waits for.
pub(crate) struct Work {
    request: BrokerRequest,
    waits: Vec<oneshot::Receiver<Result<(), BrokerError>>>,
}

/// Turns a core request into work, sending its membership part to the
/// ordered queue now (the caller holds the core's lock).
pub(crate) fn prepare(
    queue: &mpsc::UnboundedSender<MembershipOp>,
    request: BrokerRequest,
) -> Option<Work> {
    let mut waits = Vec::new();
    let acked = |waits: &mut Vec<_>| {
        let (tx, rx) = oneshot::channel();
        waits.push(rx);
        Some(tx)
    };
    match request {
        BrokerRequest::Join {
            ref room,
            subscribe,
            ref presence,
            ..
        } => {
            if subscribe {
                let done = acked(&mut waits);
                let _ = queue.send(MembershipOp::Subscribe(Channel::Room(room.clone()), done));
            }
            if let Some(note) = presence {
                let done = acked(&mut waits);
                let _ = queue.send(MembershipOp::Presence {
                    room: room.clone(),
                    note: note.clone(),
                    joined: true,
                    done,
                });
            }
            Some(Work { request, waits })
        }
        BrokerRequest::Left {
            room,
            unsubscribe,
            presence,
        } => {
            if let Some(note) = presence {
                let _ = queue.send(MembershipOp::Presence {
                    room: room.clone(),
                    note,
                    joined: false,
                    done: None,
                });
            }
            if unsubscribe {
                let _ = queue.send(MembershipOp::Unsubscribe(Channel::Room(room)));
            }
            None
        }
        BrokerRequest::Subscribe(channel) => {
            let _ = queue.send(MembershipOp::Subscribe(channel, None));
            None
        }
        BrokerRequest::Unsubscribe(channel) => {
            let _ = queue.send(MembershipOp::Unsubscribe(channel));
            None
        }
        request => Some(Work { request, waits }),
    }
}

/// Applies membership changes one at a time, in order.
pub(crate) async fn run_membership(
    broker: Arc<dyn Broker>,
    mut queue: mpsc::UnboundedReceiver<MembershipOp>,
) {
    while let Some(op) = queue.recv().await {
        match op {
            MembershipOp::Subscribe(channel, done) => {
                let result = broker.subscribe(&channel).await;
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
            MembershipOp::Unsubscribe(channel) => broker.unsubscribe(&channel).await,
            MembershipOp::Presence {
                room,
                note,
                joined,
                done,
            } => {
                let result = broker
                    .presence(&room, &note.user, joined, &note.subject, note.announce)
                    .await
                    .map(|_| ());
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        }
    }
}

/// Performs work in order, feeding each result back to the core (which may
/// produce more work, done in turn).
pub(crate) async fn execute(shared: &Arc<Shared>, broker: &Arc<dyn Broker>, work: Vec<Work>) {
    let mut queue: VecDeque<Work> = work.into();
    while let Some(Work { request, waits }) = queue.pop_front() {
        let mut ready = Ok(());
        for wait in waits {
            let outcome = wait
                .await
                .unwrap_or_else(|_| Err(BrokerError("broker stopped".into())));
            if ready.is_ok() {
                ready = outcome;
            }
        }
        let more = perform(shared, broker.as_ref(), request, ready).await;
        queue.extend(more);
    }
}

async fn perform(
    shared: &Arc<Shared>,
    broker: &dyn Broker,
    request: BrokerRequest,
    ready: Result<(), BrokerError>,
) -> Vec<Work> {
    match request {
        BrokerRequest::Publish {
            room,
            body,
            exclude,
            history,
            history_ttl,
            reply,
        } => {
            let epoch = new_epoch();
            let result = broker
                .publish(PublishRequest {
                    room: &room,
                    body: &body,
                    exclude: exclude.as_ref(),
                    history,
                    history_ttl,
                    new_epoch: &epoch,
                })
                .await;
            if let Err(e) = &result {
                tracing::warn!(room = %room, error = %e, "publish failed");
            }
            let result = result.map(|_| ()).map_err(|_| ErrorCode::Unavailable);
            shared
                .run_collect(|inner, now| inner.hub.reply(now, reply, result))
                .1
        }
        BrokerRequest::Join {
            room,
            since,
            history_ttl,
            reply,
            ..
        } => {
            let state = match ready {
                Ok(()) => {
                    let since = since.as_ref().map(|(seq, epoch)| (*seq, epoch.as_str()));
                    broker
                        .room_state(&room, since, &new_epoch(), history_ttl)
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &state {
                tracing::warn!(room = %room, error = %e, "join failed");
            }
            let state = state.map_err(|_| ());
            shared
                .run_collect(|inner, now| inner.hub.complete_join(now, reply, state))
                .1
        }
        BrokerRequest::Direct { to, frame, reply } => {
            let nodes = broker.direct(&to, &frame).await.map_err(|_| ());
            shared
                .run_collect(|inner, now| inner.hub.complete_direct(now, reply, nodes))
                .1
        }
        BrokerRequest::PresenceList { room, reply } => {
            let users = broker.presence_list(&room).await.map_err(|_| ());
            shared
                .run_collect(|inner, now| inner.hub.complete_presence_list(now, reply, users))
                .1
        }
        // Membership requests went to the ordered queue in `prepare`.
        _ => Vec::new(),
    }
}

/// Feeds what the broker fans out into the core, in the broker's order.
pub(crate) async fn run_events(
    shared: std::sync::Weak<Shared>,
    broker: Arc<dyn Broker>,
    mut events: mpsc::Receiver<BrokerEvent>,
) {
    while let Some(event) = events.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match event {
            BrokerEvent::Message {
                room,
                seq,
                epoch,
                frame,
                exclude,
            } => {
                shared.run(|inner, now| {
                    inner.hub.handle_broker_message(
                        now,
                        room.as_str(),
                        seq,
                        &epoch,
                        frame,
                        exclude.as_ref(),
                    );
                });
            }
            BrokerEvent::Presence {
                room,
                frame,
                exclude,
            } => {
                shared.run(|inner, _| {
                    inner
                        .hub
                        .handle_broker_presence(room.as_str(), frame, exclude.as_ref())
                });
            }
            BrokerEvent::Direct { to, frame } => {
                shared.run(|inner, _| inner.hub.handle_broker_direct(&to, frame));
            }
            BrokerEvent::Reconnected => {
                let broker = Arc::clone(&broker);
                tokio::spawn(resync(shared, broker));
            }
        }
    }
}

/// After a broker reconnect: brings every room with local members up to
/// date (replaying what they missed, or moving them to a new epoch).
async fn resync(shared: Arc<Shared>, broker: Arc<dyn Broker>) {
    let rooms = shared.run(|inner, _| inner.hub.begin_resync());
    for room in rooms {
        let since = room
            .since
            .as_ref()
            .map(|(seq, epoch)| (*seq, epoch.as_str()));
        let state = broker
            .room_state(&room.room, since, &new_epoch(), room.history_ttl)
            .await
            .map_err(|_| ());
        shared.run(|inner, now| inner.hub.complete_resync(now, &room.room, state));
    }
}

/// A fresh room epoch: 64 random bits, URL-safe (11 characters).
pub(crate) fn new_epoch() -> String {
    let mut bytes = [0u8; 8];
    // Without OS randomness, a time-derived epoch is still unique enough to
    // tell histories apart.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos as u64).to_le_bytes();
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
