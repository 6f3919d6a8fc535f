//! Broker -> client on the kernel path (`--bulk-transfer sockmap`): the response verdict
//! delivers the responses that need no rewrite; kpscd accounts for them in order, and
//! delivers itself the stretches the verdict passes up and its own answers (see
//! `bulk::sockmap` for why the two never reorder the client's stream).

use std::{collections::VecDeque, time::Duration};

use tokio::{
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
    sync::mpsc,
};

use crate::{
    kafka::frame::{FrameError, FrameReader, HEADER_BUFFER, MoveError},
    proxy::{
        bulk::{
            copy::CopyMover,
            sockmap::{
                KernelConn,
                passed::{PassedReader, Stream},
            },
            transfer::Transfer,
        },
        connection::{
            error::ConnError,
            requests::{InFlight, Origin},
            responses::{RESPONSE_HEAD, Responses},
        },
        listeners::Route,
        state::ProxyState,
    },
};

/// How often the kernel's deliveries are looked at while kpscd waits on them: its own
/// answer is next, the connection is ending, or it holds as many requests as it may.
const KERNEL_POLL: Duration = Duration::from_millis(2);
/// Otherwise (the counters only): a connection with a long-polling Fetch outstanding
/// wakes this often.
const KERNEL_POLL_IDLE: Duration = Duration::from_millis(250);
/// How long a response with no request in flight waits for its request's report.
const KERNEL_REPORT_WAIT: Duration = Duration::from_secs(5);

/// The response direction's bookkeeping.
struct Owed {
    /// Requests whose response is still to come (or to be written), in order.
    requests: VecDeque<InFlight>,
    /// The request loop is done: nothing more will be queued.
    requests_done: bool,
    /// Responses the kernel delivered that are accounted here.
    delivered: u64,
    /// The ring position after the last request settled (answered, acks=0 passed over).
    ring_done: u64,
    max_in_flight: usize,
}

impl Owed {
    fn settled(&mut self, origin: Origin) {
        if let Some(after) = origin.ring_after() {
            self.ring_done = self.ring_done.max(after);
        }
    }

    /// Takes what the request loop queued, without waiting.
    fn take_queued(&mut self, in_flight: &mut mpsc::Receiver<InFlight>) {
        while !self.requests_done && self.requests.len() < self.max_in_flight {
            match in_flight.try_recv() {
                Ok(request) => self.requests.push_back(request),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.requests_done = true,
            }
        }
    }

    /// Waits for the next request the request loop queues; false when it is done.
    async fn wait_queued(&mut self, in_flight: &mut mpsc::Receiver<InFlight>) -> bool {
        if self.requests_done {
            return false;
        }
        match in_flight.recv().await {
            Some(request) => {
                self.requests.push_back(request);
                true
            }
            None => {
                self.requests_done = true;
                false
            }
        }
    }

    /// Accounts the responses the kernel delivered (in order, each to the oldest request
    /// expecting one; acks=0 requests before it are passed over, as the verdict does).
    fn account_kernel(&mut self, conn: &KernelConn, responses: &mut Responses, route: &Route) {
        let slot = conn.slot();
        let direction = slot.responses();
        let frames = direction.redirected_frames();
        while self.delivered < frames {
            let Some(front) = self.requests.front() else {
                // Its report is still on the way.
                break;
            };
            if !front.expects_response {
                let request = self.requests.pop_front().expect("front");
                self.settled(request.origin);
                continue;
            }
            let request = self.requests.pop_front().expect("front");
            responses.delivered_elsewhere();
            self.settled(request.origin);
            self.delivered += 1;
        }
        conn.account(&route.counters);
    }

    /// With the verdict holding the stream and nothing pending in kpscd: carried acks=0
    /// requests next leave the ring now, since Kafka will not answer them (else a producer
    /// of acks=0 alone fills it and keeps the requests off the kernel path). A broker that
    /// answers anyway meets the next entry, not this one: the verdict passes the answer,
    /// kpscd drops it. Not while kpscd delivers: an answer to its pending request would
    /// forget these ids.
    fn pass_over_acks0(&mut self, conn: &KernelConn, responses: &mut Responses) {
        let slot = conn.slot();
        while let Some(front) = self.requests.front()
            && !front.expects_response
            && front.local_response.is_none()
            && let Origin::Carried(at) = front.origin
        {
            let request = self.requests.pop_front().expect("front");
            responses.remember_acks0(request.header.correlation_id);
            slot.pass_over_expectation(at);
            self.settled(request.origin);
        }
    }

    /// Accounts the kernel's deliveries up to `frames`, waiting for their reports.
    async fn account_kernel_until(
        &mut self,
        frames: u64,
        conn: &KernelConn,
        responses: &mut Responses,
        in_flight: &mut mpsc::Receiver<InFlight>,
        route: &Route,
    ) -> Result<(), ConnError> {
        loop {
            self.account_kernel(conn, responses, route);
            if self.delivered >= frames {
                return Ok(());
            }
            if !self.wait_queued(in_flight).await {
                return Err(ConnError::KernelPath(std::io::Error::other(
                    "the kernel delivered responses to requests never reported",
                )));
            }
        }
    }

    /// Responses still owed by the broker.
    fn waiting(&self, pending: &Option<InFlight>) -> usize {
        self.requests.iter().filter(|r| r.expects_response).count()
            + usize::from(pending.as_ref().is_some_and(|r| r.expects_response))
    }
}

/// Forwards responses until the request side is done and everything owed was delivered,
/// or the broker side ends.
pub async fn forward_responses_kernel(
    upstream_r: OwnedReadHalf,
    client_w: &mut OwnedWriteHalf,
    mut in_flight: mpsc::Receiver<InFlight>,
    conn: &KernelConn,
    route: &Route,
    state: &ProxyState,
) -> Result<(), ConnError> {
    // Copied, never spliced: what the verdict passes up is on the psock's queue, which
    // splice(2) cannot read.
    let mover = CopyMover;
    // An end of stream read before bytes the verdict passed is not the end (see `passed`).
    let upstream_r = PassedReader::new(upstream_r, conn.slot(), Stream::Responses);
    let reader = FrameReader::new(upstream_r, HEADER_BUFFER);
    let mut direction = Userspace {
        reader,
        mover,
        responses: Responses::default(),
        pending: None,
        epoch: 0,
        offset: 0,
        written: 0,
        drained: false,
    };
    let mut owed = Owed {
        requests: VecDeque::new(),
        requests_done: false,
        delivered: 0,
        ring_done: 0,
        max_in_flight: state.config.max_in_flight,
    };
    let done = loop {
        if owed.requests_done && owed.nothing_owed() && direction.quiet(conn) {
            break Ok(());
        }
        // The verdict has the stream.
        let poll = if owed.requests_done {
            Some(KERNEL_POLL)
        } else if owed.requests.is_empty() {
            None
        } else if owed.requests.len() >= owed.max_in_flight || owed.kpscd_owes_some() {
            Some(KERNEL_POLL)
        } else {
            Some(KERNEL_POLL_IDLE)
        };
        let data = tokio::select! {
            biased;
            _ = owed.wait_queued(&mut in_flight), if !owed.requests_done
                && owed.requests.len() < owed.max_in_flight => None,
            more = direction.reader.fill_to(1) => Some(more.map_err(ConnError::Broker)?),
            _ = tokio::time::sleep(poll.unwrap_or_default()), if poll.is_some() => None,
        };
        owed.account_kernel(conn, &mut direction.responses, route);
        owed.pass_over_acks0(conn, &mut direction.responses);
        if conn
            .hold_if_backlogged(Stream::Responses, client_w.as_ref(), direction.written)
            .map_err(ConnError::KernelPath)?
        {
            route.counters.kernel_to_client.backlog_holds.inc();
        }
        // Bytes the verdict passed up; or kpscd's own answer (or a request it handled) is
        // next, past acks=0 requests the broker will not answer, and the kernel is not in
        // the middle of a response: the verdict stops at the marker before that request.
        // Either way kpscd takes the stream.
        let kpscd_takes = match data {
            Some(false) => {
                // The broker closed. A response the verdict was carrying counts as
                // delivered once its head went by, but its rest never comes: it is owed
                // still, as a frame cut short is on the userspace path. The end is read
                // only after the verdict has seen every byte before it, so `frame_left`
                // is final.
                owed.take_queued(&mut in_flight);
                let cut_short = usize::from(conn.slot().responses().frame_left() > 0);
                break match owed.waiting(&None) + in_flight.len() + cut_short {
                    0 => Ok(()),
                    waiting => Err(ConnError::BrokerClosed(waiting)),
                };
            }
            Some(true) => true,
            None => {
                owed.kpscds_turn() && direction.quiet(conn) && conn.slot().responses().in_kernel()
            }
        };
        if kpscd_takes
            && let Some(done) = direction
                .deliver(client_w, &mut in_flight, conn, &mut owed, route, state)
                .await?
        {
            break done;
        }
    };
    // What the kernel delivered reaches the client before the FIN.
    conn.drain_responses(client_w.as_ref(), direction.written)
        .await
        .map_err(ConnError::KernelPath)?;
    done
}

impl Owed {
    /// Only acks=0 requests the broker will not answer are left.
    fn nothing_owed(&self) -> bool {
        self.requests
            .iter()
            .all(|r| !r.expects_response && r.local_response.is_none())
    }

    /// A request kpscd handled is among those owed.
    fn kpscd_owes_some(&self) -> bool {
        self.requests
            .iter()
            .any(|r| !matches!(r.origin, Origin::Carried(_)))
    }

    /// The next request owed something that is not a carried acks=0 is one kpscd handled.
    fn kpscds_turn(&self) -> bool {
        self.requests
            .iter()
            .find(|r| r.expects_response || !matches!(r.origin, Origin::Carried(_)))
            .is_some_and(|r| !matches!(r.origin, Origin::Carried(_)))
    }
}

/// kpscd settled a carried request while it has the response stream: its entry, and
/// every one before it, leave the expectation ring, so the request verdict sees the room
/// (it takes its stream back only with room for a frame and a marker).
fn advance_past(conn: &KernelConn, origin: Origin) {
    if let Origin::Carried(at) = origin {
        conn.slot().advance_expect_head(at + 1);
    }
}

/// The response direction while kpscd has the stream.
struct Userspace<'c> {
    reader: FrameReader<PassedReader<'c, OwnedReadHalf>>,
    mover: CopyMover,
    responses: Responses,
    /// The oldest request, taken out of `Owed::requests` to be answered.
    pending: Option<InFlight>,
    /// The stretch passed up that kpscd is in (0: none yet).
    epoch: u32,
    /// Stream offset of the first byte kpscd has not handled.
    offset: u64,
    /// Bytes kpscd wrote to the client itself.
    written: u64,
    /// The kernel's redirects have reached the client socket since kpscd took the stream.
    drained: bool,
}

impl Userspace<'_> {
    /// Delivers responses in order, those the verdict passed up and kpscd's own answers,
    /// until it can give the stream back (None) or the connection's responses are done
    /// (Some: how it ended).
    async fn deliver(
        &mut self,
        client_w: &mut OwnedWriteHalf,
        in_flight: &mut mpsc::Receiver<InFlight>,
        conn: &KernelConn,
        owed: &mut Owed,
        route: &Route,
        state: &ProxyState,
    ) -> Result<Option<Result<(), ConnError>>, ConnError> {
        self.drained = false;
        if !self.reader.buffered().is_empty() {
            self.new_stretch(client_w, in_flight, conn, owed, route)
                .await?;
        }
        loop {
            if self.pending.is_none() {
                owed.take_queued(in_flight);
                self.pending = owed.requests.pop_front();
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|r| r.local_response.is_some() || !r.expects_response)
                {
                    self.drain(client_w, conn, owed, route).await?;
                    if let Some((origin, written)) = self
                        .responses
                        .settle_unanswered(&mut self.pending, client_w, route, state)
                        .await?
                    {
                        owed.settled(origin);
                        advance_past(conn, origin);
                        self.written += written as u64;
                    }
                    continue;
                }
            }
            if self.reader.buffered().is_empty() {
                if self.try_hand_back(conn, owed, in_flight) {
                    return Ok(None);
                }
                if owed.requests_done
                    && self.pending.is_none()
                    && owed.requests.is_empty()
                    && self.quiet(conn)
                {
                    return Ok(Some(Ok(())));
                }
                tokio::select! {
                    biased;
                    _ = owed.wait_queued(in_flight), if self.pending.is_none() && !owed.requests_done => {}
                    _ = tokio::time::sleep(KERNEL_POLL), if owed.requests_done => {}
                    more = self.reader.fill_to(1) => {
                        if !more.map_err(ConnError::Broker)? {
                            let waiting = owed.waiting(&self.pending) + in_flight.len();
                            return Ok(Some(if waiting == 0 { Ok(()) } else { Err(ConnError::BrokerClosed(waiting)) }));
                        }
                        self.new_stretch(client_w, in_flight, conn, owed, route).await?;
                    }
                }
                continue;
            }
            self.drain(client_w, conn, owed, route).await?;
            let waiting = owed.waiting(&self.pending) + in_flight.len();
            match self.reader.fill_to(RESPONSE_HEAD).await {
                Ok(true) => {}
                Ok(false) | Err(FrameError::Truncated) => {
                    return Ok(Some(Err(ConnError::BrokerClosed(waiting))));
                }
                Err(e) => return Err(ConnError::Broker(e)),
            }
            if self.pending.is_none() && !self.responses.answers_acks0(self.reader.buffered()) {
                // A response before its request's report: wait for the report, then
                // settle what comes first (kpscd's own answers, acks=0).
                let reported = tokio::select! {
                    biased;
                    queued = owed.wait_queued(in_flight) => queued,
                    _ = tokio::time::sleep(KERNEL_REPORT_WAIT) => false,
                };
                if reported {
                    continue;
                }
            }
            let forwarded = self
                .responses
                .forward_one(
                    &mut self.reader,
                    client_w,
                    &mut self.mover,
                    &mut self.pending,
                    waiting,
                    route,
                    state,
                )
                .await?;
            route.counters.kernel_to_client.passed_frames.inc();
            if let Some(origin) = forwarded.answered {
                owed.settled(origin);
                advance_past(conn, origin);
            }
            self.offset += forwarded.consumed as u64;
            self.written += forwarded.written as u64;
        }
    }

    /// Nothing of the response stream is under way: the kernel is not in the middle of a
    /// response, no stretch it passed is unread, nothing read is left over. Read in that
    /// order: a pass resets the frame state, so the epoch is read after it.
    fn quiet(&self, conn: &KernelConn) -> bool {
        let slot = conn.slot();
        let responses = slot.responses();
        responses.frame_left() == 0
            && responses.pass().epoch == self.epoch
            && self.reader.buffered().is_empty()
    }

    /// Before kpscd's first write to the client: every response the kernel delivered is
    /// accounted and has reached the client socket.
    async fn drain(
        &mut self,
        client_w: &mut OwnedWriteHalf,
        conn: &KernelConn,
        owed: &mut Owed,
        route: &Route,
    ) -> Result<(), ConnError> {
        if self.drained {
            return Ok(());
        }
        owed.account_kernel(conn, &mut self.responses, route);
        conn.drain_responses(client_w.as_ref(), self.written)
            .await
            .map_err(ConnError::KernelPath)?;
        self.drained = true;
        Ok(())
    }

    /// Bytes arrived at a frame boundary: if they begin a stretch the verdict passed,
    /// account for what it delivered before, and forward the tail of a response whose
    /// start it redirected.
    async fn new_stretch(
        &mut self,
        client_w: &mut OwnedWriteHalf,
        in_flight: &mut mpsc::Receiver<InFlight>,
        conn: &KernelConn,
        owed: &mut Owed,
        route: &Route,
    ) -> Result<(), ConnError> {
        let pass = conn.slot().responses().pass();
        if pass.epoch == self.epoch {
            return Ok(());
        }
        self.epoch = pass.epoch;
        self.offset = pass.from;
        if let Some(request) = self.pending.take() {
            owed.requests.push_front(request);
        }
        owed.account_kernel_until(
            pass.frames_before,
            conn,
            &mut self.responses,
            in_flight,
            route,
        )
        .await?;
        self.drained = false;
        self.drain(client_w, conn, owed, route).await?;
        if pass.tail > 0 {
            let tail = pass.tail as usize;
            self.mover
                .forward(&mut self.reader, tail, client_w)
                .await
                .map_err(|e| match e {
                    MoveError::Source(e) => ConnError::Broker(e),
                    MoveError::Sink(e) => ConnError::ClientWrite(e),
                    MoveError::Mover(e) => ConnError::Uring(e),
                })?;
            route.counters.bytes_to_client.inc_by(tail as u64);
            self.offset += tail as u64;
            self.written += tail as u64;
        }
        Ok(())
    }

    /// Gives the stream back to the verdict if nothing kpscd must deliver is owed: no
    /// request it handled is unanswered and the request verdict has its stream (so every
    /// stretch it passed is over and its requests are queued here). Moves the expectation
    /// ring's head to the first response still owed, then publishes the resume offset.
    fn try_hand_back(
        &mut self,
        conn: &KernelConn,
        owed: &mut Owed,
        in_flight: &mut mpsc::Receiver<InFlight>,
    ) -> bool {
        let slot = conn.slot();
        if !slot.requests().in_kernel() {
            return false;
        }
        // The verdict passed a stretch kpscd has not read yet.
        if !slot.responses().in_kernel() && slot.responses().pass().epoch != self.epoch {
            return false;
        }
        owed.take_queued(in_flight);
        if let Some(request) = self.pending.take() {
            owed.requests.push_front(request);
        }
        if !in_flight.is_empty() {
            // More queued than kpscd holds at once: some may be requests it handled.
            return false;
        }
        let mut head = None;
        for request in &owed.requests {
            match request.origin {
                Origin::Carried(at) => {
                    head.get_or_insert(at);
                }
                _ => return false,
            }
        }
        slot.set_expect_head(head.unwrap_or(owed.ring_done));
        if !slot.responses().in_kernel() {
            slot.responses().resume_at(self.offset);
        }
        true
    }
}
