//! What the applications did, as the simulation (which sees both sides) records it: the
//! reference every observation of the connections is checked against.

use std::time::Instant;

use fluidity_proto::{ErrorCode, RefusalReason, Side, StreamId};

/// One direction of a stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirModel {
    /// Bytes the writer's `write` accepted.
    pub written: u64,
    /// The writer's `finish` succeeded.
    pub finished: bool,
    /// Bytes the reader got (each checked against the pattern).
    pub read: u64,
    /// The reader saw the end of the stream.
    pub eof: bool,
}

/// How a stream ended for one side's application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Not started on this side (agent: not opened; server: no open request yet).
    NotStarted,
    /// Alive.
    Open,
    /// Finished writing and read the peer's end.
    Completed,
    /// This side reset it.
    ResetLocal(ErrorCode),
    /// The peer reset it.
    ResetByPeer(ErrorCode),
    /// Agent: the open was refused. Server: the application refused it.
    Refused(RefusalReason),
    /// Agent: never opened because the connection was going away or closed.
    NeverOpened,
    /// The connection was lost while the stream was alive.
    Lost,
}

impl End {
    /// Whether the stream is over for this side.
    pub fn is_final(self) -> bool {
        !matches!(self, End::NotStarted | End::Open)
    }
}

/// One side's application view of a stream.
#[derive(Debug, Clone, Copy)]
pub struct AppStream {
    /// Where it is.
    pub end: End,
    /// When it started on this side (agent: opened; server: accepted).
    pub started: Option<Instant>,
    /// A `Readable` event is outstanding.
    pub readable: bool,
    /// A write returned `Blocked`; waiting for `Writable`.
    pub write_blocked: bool,
    /// A slow reader's next read.
    pub next_read: Option<Instant>,
    /// The planned reset was attempted.
    pub reset_tried: bool,
}

impl Default for AppStream {
    fn default() -> Self {
        AppStream {
            end: End::NotStarted,
            started: None,
            readable: false,
            write_blocked: false,
            next_read: None,
            reset_tried: false,
        }
    }
}

/// Everything about one planned stream.
#[derive(Debug, Default, Clone)]
pub struct StreamModel {
    /// Its id, once opened.
    pub id: Option<StreamId>,
    /// Agent to server.
    pub up: DirModel,
    /// Server to agent.
    pub down: DirModel,
    /// The agent application.
    pub agent: AppStream,
    /// The server application.
    pub server: AppStream,
    /// Agent: `Opened` arrived.
    pub opened: bool,
    /// Server: the open request reached the application, and when its answer is due.
    pub answer_at: Option<Instant>,
    /// Server: the application accepted it.
    pub accepted: bool,
}

impl StreamModel {
    /// One side's application view.
    pub fn app(&self, side: Side) -> &AppStream {
        match side {
            Side::Agent => &self.agent,
            Side::Server => &self.server,
        }
    }

    /// One side's application view, mutably.
    pub fn app_mut(&mut self, side: Side) -> &mut AppStream {
        match side {
            Side::Agent => &mut self.agent,
            Side::Server => &mut self.server,
        }
    }

    /// The direction `side` writes.
    pub fn sending(&self, side: Side) -> &DirModel {
        match side {
            Side::Agent => &self.up,
            Side::Server => &self.down,
        }
    }

    /// The direction `side` writes, mutably.
    pub fn sending_mut(&mut self, side: Side) -> &mut DirModel {
        match side {
            Side::Agent => &mut self.up,
            Side::Server => &mut self.down,
        }
    }

    /// The direction `side` reads.
    pub fn receiving(&self, side: Side) -> &DirModel {
        self.sending(other(side))
    }

    /// The direction `side` reads, mutably.
    pub fn receiving_mut(&mut self, side: Side) -> &mut DirModel {
        self.sending_mut(other(side))
    }
}

/// The other side.
pub fn other(side: Side) -> Side {
    match side {
        Side::Agent => Side::Server,
        Side::Server => Side::Agent,
    }
}

/// The direction number used in the byte pattern: 0 agent to server, 1 server to agent.
pub fn dir_of(writer: Side) -> u64 {
    match writer {
        Side::Agent => 0,
        Side::Server => 1,
    }
}
