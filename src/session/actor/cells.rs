//! Cells and requests in the session actor: the queue, sending, routing every kernel message
//! to its cell by parent `msg_id`, the output cap, finishing and aborting cells, and
//! client-built messages (forwarded, or waiting for a starting kernel).

use super::*;

impl Actor {
    /// Sends the next queued cell when the kernel is ready and nothing runs.
    pub(super) async fn start_next(&mut self) -> Result<(), KernelError> {
        if self.running.is_some() || self.state != KernelState::Idle || self.blocking_installs > 0 {
            return Ok(());
        }
        if self.queue.is_empty() {
            return Ok(());
        }
        self.refresh_imports().await?;
        // `queued` gives the cell's bytes back to the session's budget once it is sent.
        let Some((request, queued)) = self.queue.pop_front() else {
            return Ok(());
        };
        self.update_status(|s| s.queued = self.queue.len());
        let Some(client) = &self.client else {
            self.queue.push_front((request, queued));
            return Ok(());
        };
        let user_expressions = self
            .files
            .as_ref()
            .map_or_else(|| json!({}), FilesTracker::user_expressions);
        let content = json!({
            "code": request.code,
            "silent": request.silent,
            "store_history": request.store_history,
            "user_expressions": user_expressions,
            "allow_stdin": request.allow_stdin,
            "stop_on_error": true,
        });
        let started = Instant::now();
        match client
            .request(Channel::Shell, "execute_request", content, None)
            .await
        {
            Ok(msg_id) => {
                self.remember(&msg_id, &request.cell);
                let span = tracing::info_span!("cell", session = %self.id, cell = %request.cell);
                tracing::debug!(parent: &span, "cell started");
                self.running = Some(Running {
                    span,
                    cell: request.cell,
                    msg_id,
                    started,
                    deadline: request
                        .timeout
                        .or(self.opts.default_cell_timeout)
                        .map(|t| started + t),
                    reply: None,
                    idle: false,
                    idle_wait: None,
                    idle_lost: false,
                    timed_out: false,
                    restart_at: None,
                    output_bytes: 0,
                    dropped_bytes: 0,
                    dropped_messages: 0,
                    files: None,
                });
                self.set_state(KernelState::Busy, None);
                Ok(())
            }
            Err(e) => {
                self.reject(
                    Some(request.cell.clone()),
                    format!("cannot send the cell to the kernel: {e}"),
                );
                self.emit(
                    Some(request.cell.clone()),
                    EventKind::Done {
                        status: "aborted",
                        execution_count: None,
                        duration_ms: 0,
                        files: None,
                        idle_lost: false,
                    },
                );
                Err(e)
            }
        }
    }

    /// Sends the messages that waited for the kernel (or rejects them if it did not come up).
    pub(super) async fn flush_forwards(&mut self) {
        for (channel, msg, origin, queued) in std::mem::take(&mut self.forwards) {
            self.forward(channel, msg, origin, queued).await;
        }
        for (msg_type, content, query) in std::mem::take(&mut self.pending_queries) {
            self.query(msg_type, content, query).await;
        }
    }

    /// Sends a client-built message as it is (only signed); answers are tagged with `origin`.
    /// While the kernel is starting or restarting, messages wait (bounded) and go once it is
    /// ready, as a Jupyter client expects of a kernel it just started. `queued` (the message's
    /// bytes in the session's budget, `--max-queued-mb`) is held while it waits and given back
    /// once it is sent or refused.
    pub(super) async fn forward(
        &mut self,
        channel: Channel,
        msg: Message,
        origin: Arc<str>,
        queued: Queued,
    ) {
        if channel == Channel::Shell
            && let Err(e) = self.refresh_imports().await
        {
            tracing::debug!(session = %self.id, error = %e, "cannot refresh import caches");
        }
        let Some(client) = &self.client else {
            let waiting = matches!(self.state, KernelState::Starting | KernelState::Restarting);
            if waiting && self.forwards.len() < self.opts.max_queue {
                self.forwards.push_back((channel, msg, origin, queued));
                return;
            }
            let state = self.state.as_str();
            let why = if waiting {
                format!(
                    "the kernel is {state} and {} messages wait for it already",
                    self.forwards.len()
                )
            } else {
                format!("the kernel is {state}")
            };
            self.reject(
                Some(origin),
                format!("{why}: {} was not sent", msg.msg_type()),
            );
            return;
        };
        let sent = client.send(channel, msg).await;
        drop(queued);
        match sent {
            Ok(msg_id) => self.remember(&msg_id, &origin),
            Err(e) => self.reject(Some(origin), format!("cannot send to the kernel: {e}")),
        }
    }

    pub(super) fn enqueue(&mut self, request: ExecuteRequest, queued: Queued) {
        let cell = request.cell.clone();
        match self.state {
            KernelState::Dead | KernelState::Closed => {
                self.reject_cell(cell, "the kernel is dead: send a restart first".into());
                return;
            }
            _ => {}
        }
        if self.queue.len() >= self.opts.max_queue {
            let max = self.opts.max_queue;
            self.reject_cell(
                cell,
                format!("the queue is full ({max} cells wait already)"),
            );
            return;
        }
        let position = self.queue.len() + usize::from(self.running.is_some());
        self.queue.push_back((request, queued));
        self.update_status(|s| s.queued = self.queue.len());
        self.emit(Some(cell), EventKind::Accepted { position });
    }

    pub(super) async fn input_reply(&mut self, value: String) {
        let (Some(client), Some(parent)) = (&self.client, self.input_parent.take()) else {
            self.reject(None, "no input is pending".into());
            return;
        };
        let content = json!({ "value": value });
        if let Err(e) = client
            .request(Channel::Stdin, "input_reply", content, Some(&parent))
            .await
        {
            self.reject(None, format!("cannot send input: {e}"));
        }
    }

    pub(super) async fn query(&mut self, msg_type: &'static str, content: Value, query: CodeQuery) {
        let Some(client) = &self.client else {
            let waiting = matches!(self.state, KernelState::Starting | KernelState::Restarting);
            if waiting && self.pending_queries.len() < self.opts.max_queue {
                // Like cells, queries wait for a starting kernel.
                self.pending_queries.push_back((msg_type, content, query));
                return;
            }
            self.reject(
                Some(query.id),
                format!("the kernel is {}", self.state.as_str()),
            );
            return;
        };
        match client
            .request(Channel::Shell, msg_type, content, None)
            .await
        {
            Ok(msg_id) => {
                self.queries.insert(msg_id, query.id);
            }
            Err(e) => self.reject(Some(query.id), format!("cannot send {msg_type}: {e}")),
        }
    }

    pub(super) fn on_message(&mut self, channel: Channel, msg: Arc<Message>) {
        self.update_status(|s| s.last_activity = Utc::now());
        let parent = msg.parent_id().map(str::to_owned);
        if channel == Channel::Control
            && let Some(u) = &self.unresponsive
            && u.probe.is_some()
            && u.probe == parent
        {
            self.kernel_answered();
            return;
        }
        if parent
            .as_ref()
            .is_some_and(|p| self.internal.iter().any(|i| i == p))
        {
            return;
        }
        let is_running =
            |r: &Option<Running>| matches!((r, &parent), (Some(r), Some(p)) if &r.msg_id == p);

        // Replies to completion/inspection requests and their busy/idle chatter.
        if let Some(p) = &parent
            && let Some(id) = self.queries.get(p).cloned()
        {
            if channel == Channel::Shell {
                self.queries.remove(p);
                self.emit(Some(id), EventKind::Kernel { channel, msg });
            }
            return;
        }
        if channel == Channel::Control && msg.msg_type() == "interrupt_reply" {
            self.interrupt_deadline = None;
        }

        let running = is_running(&self.running);
        if channel == Channel::IoPub
            && let Some(r) = self.running.as_mut()
            && r.idle_wait.is_some()
        {
            // iopub may lag behind shell (a big burst of output): the grace counts from the
            // last iopub message, so only an iopub that went quiet without the idle is a loss.
            r.idle_wait = Some(Instant::now() + IDLE_GRACE);
        }
        let cell = if running {
            self.running.as_ref().map(|r| r.cell.clone())
        } else {
            parent.as_deref().and_then(|p| self.recent_cell(p))
        };
        match (channel, msg.msg_type()) {
            (Channel::Stdin, "input_request") => self.input_parent = Some(msg.header.clone()),
            (Channel::Shell, "execute_reply") if running => {
                // Parsed here and dropped: the message is kept for replay, its value is not.
                let reply: Value = msg.content.view().unwrap_or_default();
                let status = reply
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("error");
                let count = reply.get("execution_count").and_then(Value::as_i64);
                let files = self.files.as_mut().and_then(|f| f.read_reply(&reply));
                if let Some(r) = self.running.as_mut() {
                    r.reply = Some((status.to_owned(), count));
                    r.files = files;
                    if !r.idle {
                        r.idle_wait = Some(Instant::now() + IDLE_GRACE);
                    }
                }
            }
            (Channel::IoPub, "status") if running => {
                if execution_state(&msg).as_deref() == Some("idle")
                    && let Some(r) = self.running.as_mut()
                {
                    r.idle = true;
                }
            }
            _ => {}
        }
        if running && channel == Channel::IoPub && !self.within_output_cap(&msg) {
            self.finish_if_done();
            return;
        }
        self.emit(cell, EventKind::Kernel { channel, msg });
        self.finish_if_done();
    }

    /// Counts an output message of the running cell against the per-cell cap; `false` when it
    /// must be dropped (the first drop is announced, the total at the cell's end).
    pub(super) fn within_output_cap(&mut self, msg: &Message) -> bool {
        // Measured as the content's JSON text: what the cell's output costs to relay and keep.
        let size = match msg.msg_type() {
            "stream" | "display_data" | "update_display_data" | "execute_result" | "error" => {
                msg.content.len()
            }
            _ => return true,
        };
        let cap = self.opts.max_cell_output_bytes;
        let Some(r) = self.running.as_mut() else {
            return true;
        };
        if r.dropped_messages == 0 && r.output_bytes + size <= cap {
            r.output_bytes += size;
            return true;
        }
        r.dropped_bytes += size;
        r.dropped_messages += 1;
        if r.dropped_messages == 1 {
            let cell = r.cell.clone();
            self.emit(
                Some(cell),
                EventKind::Limit {
                    limit: "OutputLimit",
                    message: format!(
                        "the cell's output passed its limit of {}: further output is dropped",
                        human_bytes(cap)
                    ),
                },
            );
        }
        false
    }

    /// Emits `done` once the cell's reply and its final idle status have both arrived, so every
    /// output of the cell reaches clients before it (or once `IDLE_GRACE` passed after the reply
    /// without the idle: `on_deadline` then marks it `idle_lost`).
    pub(super) fn finish_if_done(&mut self) {
        let done = matches!(&self.running, Some(r) if r.idle && r.reply.is_some());
        if !done {
            return;
        }
        let Some(r) = self.running.take() else { return };
        let (status, count) = r.reply.clone().unwrap_or_else(|| ("error".into(), None));
        let status: &'static str = match (r.timed_out, status.as_str()) {
            (true, _) => "timeout",
            (false, "ok") => "ok",
            (false, "aborted") => "aborted",
            _ => "error",
        };
        if let Some(count) = count {
            self.update_status(|s| s.execution_count = count);
        }
        if r.dropped_messages > 0 {
            self.emit(
                Some(r.cell.clone()),
                EventKind::Limit {
                    limit: "OutputLimit",
                    message: format!(
                        "dropped {} of output in {} messages beyond the cell's limit of {}",
                        human_bytes(r.dropped_bytes),
                        r.dropped_messages,
                        human_bytes(self.opts.max_cell_output_bytes)
                    ),
                },
            );
        }
        self.interrupt_deadline = None;
        if r.idle_lost {
            tracing::warn!(
                parent: &r.span,
                grace_ms = millis(IDLE_GRACE),
                "the cell's idle status never came (iopub dropped it): finished without it"
            );
        }
        let duration_ms = self.cell_finished(&r.span, r.started, status);
        self.emit(
            Some(r.cell),
            EventKind::Done {
                status,
                execution_count: count,
                duration_ms,
                files: r.files,
                idle_lost: r.idle_lost,
            },
        );
        self.set_state(KernelState::Idle, None);
    }

    /// Tells clients that the running and queued cells will never finish.
    pub(super) fn abort_all(&mut self, status: &'static str) {
        if let Some(r) = self.running.take() {
            let duration_ms = self.cell_finished(&r.span, r.started, status);
            self.emit(
                Some(r.cell),
                EventKind::Done {
                    status,
                    execution_count: None,
                    duration_ms,
                    files: None,
                    idle_lost: false,
                },
            );
        }
        for (request, _) in std::mem::take(&mut self.queue) {
            self.emit(
                Some(request.cell),
                EventKind::Done {
                    status,
                    execution_count: None,
                    duration_ms: 0,
                    files: None,
                    idle_lost: false,
                },
            );
        }
        self.queries.clear();
        self.input_parent = None;
        self.update_status(|s| s.queued = 0);
    }

    pub(super) fn remember(&mut self, msg_id: &str, cell: &Arc<str>) {
        if self.recent.len() == RECENT_CELLS {
            self.recent.pop_front();
        }
        self.recent.push_back((msg_id.to_owned(), cell.clone()));
    }

    pub(super) fn recent_cell(&self, msg_id: &str) -> Option<Arc<str>> {
        self.recent
            .iter()
            .rev()
            .find(|(id, _)| id == msg_id)
            .map(|(_, c)| c.clone())
    }
}

/// A `status` message's `execution_state`, read without keeping a parsed copy of the message.
fn execution_state(msg: &Message) -> Option<std::borrow::Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        execution_state: Option<std::borrow::Cow<'a, str>>,
    }
    msg.content
        .view::<Status<'_>>()
        .ok()
        .and_then(|s| s.execution_state)
}
