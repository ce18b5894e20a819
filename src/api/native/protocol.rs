//! The native event protocol: every message, both ways, is one JSON object in a text frame
//! whose `type` field names it. These types are the single source of truth for the wire format;
//! `protocol/native.schema.json` is generated from them (`kernelbox schema`) and a test fails when
//! the checked-in copy differs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::session::{ChangedFile, KernelState};

/// A string of an event: one of kernelbox's own, or one the kernel wrote, relayed as the JSON
/// string it is in the kernel's message (escapes and all: nothing is decoded and encoded again).
#[derive(Debug, Clone, Copy)]
pub enum Str<'a> {
    /// Text of kernelbox's own.
    Text(&'a str),
    /// A JSON string from the kernel's message, as written there.
    Raw(&'a RawValue),
}

impl<'a> From<&'a str> for Str<'a> {
    fn from(text: &'a str) -> Self {
        Str::Text(text)
    }
}

impl Serialize for Str<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Str::Text(text) => serializer.serialize_str(text),
            Str::Raw(raw) => raw.serialize(serializer),
        }
    }
}

impl JsonSchema for Str<'_> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "String".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
}

/// Any JSON value of an event: one of kernelbox's own, or one from the kernel's message, relayed
/// as written there; `null` when the kernel left it out.
#[derive(Debug, Clone, Copy)]
pub enum Json<'a> {
    /// A value of kernelbox's own.
    Value(&'a Value),
    /// A value from the kernel's message, as written there.
    Raw(&'a RawValue),
    /// Not there.
    Null,
}

impl<'a> From<&'a Value> for Json<'a> {
    fn from(value: &'a Value) -> Self {
        Json::Value(value)
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Value(value) => value.serialize(serializer),
            Json::Raw(raw) => raw.serialize(serializer),
            Json::Null => serializer.serialize_unit(),
        }
    }
}

impl JsonSchema for Json<'_> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        Value::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        Value::json_schema(generator)
    }
}

/// A message from a client to the server.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Queue a cell. Cells run one at a time in the order they arrive.
    Execute {
        /// The client's id for the cell, echoed on each of its events (generated when absent).
        #[serde(default)]
        id: Option<String>,
        /// The code to run.
        code: String,
        /// Run quietly: no output broadcast, no execution count.
        #[serde(default)]
        silent: bool,
        /// Record the cell in the kernel's history (default true).
        #[serde(default)]
        store_history: Option<bool>,
        /// Let the cell call `input()` (default true).
        #[serde(default)]
        allow_stdin: Option<bool>,
        /// Interrupt the cell after this many seconds.
        #[serde(default)]
        timeout_s: Option<f64>,
    },
    /// Interrupt the running cell.
    Interrupt {},
    /// Restart the kernel: variables are lost, running and queued cells are aborted.
    Restart {},
    /// Answer the pending `input()` prompt.
    InputReply {
        /// The line typed.
        value: String,
    },
    /// Ask for completions at `cursor`.
    Complete {
        /// The client's id for the request, echoed on the reply.
        #[serde(default)]
        id: Option<String>,
        /// The code.
        code: String,
        /// Cursor position in unicode code points.
        cursor: usize,
    },
    /// Ask whether `code` is a complete statement (a REPL's "run or continue?" question).
    IsComplete {
        /// The client's id for the request, echoed on the reply.
        #[serde(default)]
        id: Option<String>,
        /// The code typed so far.
        code: String,
    },
    /// Install Python packages into the session's own environment (if the operator allows
    /// installs). Progress comes as `install_started`, `install_output` and `install_done`
    /// events with this `id`; cells keep running meanwhile.
    Install {
        /// The client's id for the install, echoed on its events (generated when absent).
        #[serde(default)]
        id: Option<String>,
        /// pip requirements: names with optional `[extras]` and version specifiers.
        packages: Vec<String>,
    },
    /// Ask the kernel who it is: language, versions, banner. Answered by `kernel_info_reply`.
    KernelInfo {
        /// The client's id for the request, echoed on the reply.
        #[serde(default)]
        id: Option<String>,
    },
    /// Ask for documentation of the object at `cursor`.
    Inspect {
        /// The client's id for the request, echoed on the reply.
        #[serde(default)]
        id: Option<String>,
        /// The code.
        code: String,
        /// Cursor position in unicode code points.
        cursor: usize,
        /// 0 for the signature and docstring, 1 for source as well.
        #[serde(default)]
        detail_level: u8,
    },
}

/// A message from the server to a client: an event and its place in the session's order.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ServerMessage<'a> {
    /// The session's sequence number of the event (absent on replies to this connection only,
    /// such as errors about a bad frame).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The id of the cell or request the event belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    /// The event.
    #[serde(flatten)]
    pub event: ServerEvent<'a>,
}

/// The events a client receives. Fields holding kernel data borrow from the kernel's message:
/// nothing is copied per subscriber.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent<'a> {
    /// The cell was queued; `position` cells run before it.
    Accepted {
        /// Cells ahead of it (0: it runs now).
        position: usize,
    },
    /// The kernel's busy/idle status while it works on the cell.
    Status {
        /// `busy` or `idle`.
        state: Str<'a>,
    },
    /// Text the cell printed.
    Stream {
        /// `stdout` or `stderr`.
        name: Str<'a>,
        /// The text.
        text: Str<'a>,
    },
    /// Rich output (images, HTML, …) by MIME type; PNGs are base64.
    DisplayData {
        /// MIME type → content.
        data: Json<'a>,
        /// MIME type → metadata.
        metadata: Json<'a>,
        /// `display_id` and other transient data.
        #[serde(skip_serializing_if = "Option::is_none")]
        transient: Option<Json<'a>>,
    },
    /// Replaces an earlier display with the same `transient.display_id`.
    UpdateDisplayData {
        /// MIME type → content.
        data: Json<'a>,
        /// MIME type → metadata.
        metadata: Json<'a>,
        /// Holds the `display_id` to update.
        #[serde(skip_serializing_if = "Option::is_none")]
        transient: Option<Json<'a>>,
    },
    /// The value of the cell's last expression.
    ExecuteResult {
        /// The cell's execution count.
        execution_count: Option<i64>,
        /// MIME type → content.
        data: Json<'a>,
        /// MIME type → metadata.
        metadata: Json<'a>,
    },
    /// An exception raised by the cell, or a request the server could not carry out
    /// (`ename` `InvalidMessage` or `Rejected`; then `traceback` is empty).
    Error {
        /// Exception class name.
        ename: Str<'a>,
        /// Exception message.
        evalue: Str<'a>,
        /// Traceback lines (with ANSI colours).
        traceback: Json<'a>,
    },
    /// The cell called `input()`; answer with `input_reply`.
    InputRequest {
        /// The prompt.
        prompt: Str<'a>,
        /// Whether the input should be hidden.
        password: bool,
    },
    /// Clear the cell's output (when the next output arrives, if `wait`).
    ClearOutput {
        /// Wait for new output before clearing.
        wait: bool,
    },
    /// The cell finished; all its output came before this.
    Done {
        /// `ok`, `error`, `aborted`, `timeout` or `rejected`.
        status: &'a str,
        /// The cell's execution count.
        execution_count: Option<i64>,
        /// Time from start to finish.
        duration_ms: u64,
        /// Files under `output/` (in the working directory) the cell created or changed, when
        /// known (cells that succeed, Python kernels); fetch them with
        /// `GET /v1/sessions/{id}/files/{path}`.
        #[serde(skip_serializing_if = "Option::is_none")]
        files: Option<&'a [ChangedFile]>,
        /// `true` when the kernel's final `idle` status for the cell never arrived (the kernel's
        /// output channel dropped messages): the cell was finished once its output channel had been quiet for 2 s after the kernel's reply,
        /// and some of its output may be missing. Absent otherwise.
        #[serde(skip_serializing_if = "Option::is_none")]
        idle_lost: Option<bool>,
    },
    /// The session's kernel changed state.
    Kernel {
        /// The new state.
        state: KernelState,
        /// Why (for `dead`: `out of memory`, `exited with code N`, `heartbeat lost`).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// A package install started (`id`: the install's; `packages` for the ones a session was
    /// created with).
    InstallStarted {
        /// The requirements being installed.
        packages: &'a [String],
    },
    /// One line of pip's output.
    InstallOutput {
        /// The line.
        text: &'a str,
    },
    /// A package install finished; on failure an `error` event (`ename` `InstallError`) with
    /// the same message came just before.
    InstallDone {
        /// `ok` or `error`.
        status: &'a str,
        /// What went wrong (pip's error lines), for `error`.
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<&'a str>,
    },
    /// Sent first on a connection that resumed with `?since=N`: the buffered events after `N`
    /// follow (`replayed` of them), then live ones. `dropped` events after `N` were no longer
    /// buffered (the session's replay buffer overflowed while nobody was connected).
    Resumed {
        /// The last sequence number the client had seen.
        since: u64,
        /// Events replayed before the live ones.
        replayed: usize,
        /// Events missed that can no longer be replayed.
        dropped: u64,
    },
    /// Completions for a `complete` request.
    CompleteReply {
        /// Candidate completions.
        matches: Json<'a>,
        /// Start of the text to replace.
        cursor_start: Option<i64>,
        /// End of the text to replace.
        cursor_end: Option<i64>,
        /// Extra information (types, signatures).
        metadata: Json<'a>,
    },
    /// Answer to `is_complete`.
    IsCompleteReply {
        /// `complete`, `incomplete`, `invalid` or `unknown`.
        status: Str<'a>,
        /// For `incomplete`: the indentation of the next line.
        #[serde(skip_serializing_if = "Option::is_none")]
        indent: Option<Str<'a>>,
    },
    /// The kernel's answer to `kernel_info`.
    KernelInfoReply {
        /// Jupyter messaging protocol version the kernel speaks.
        protocol_version: Str<'a>,
        /// The kernel's implementation (`ipython`).
        implementation: Str<'a>,
        /// Its version.
        implementation_version: Str<'a>,
        /// Language name, version, MIME type, file extension, …
        language_info: Json<'a>,
        /// The kernel's banner text.
        banner: Str<'a>,
    },
    /// Documentation for an `inspect` request.
    InspectReply {
        /// Whether an object was found.
        found: bool,
        /// MIME type → documentation.
        data: Json<'a>,
        /// MIME type → metadata.
        metadata: Json<'a>,
    },
}

/// The JSON Schema of both directions of the protocol, as checked in under `protocol/`.
pub fn json_schema() -> Value {
    let client = schemars::schema_for!(ClientMessage);
    let server = schemars::schema_for!(ServerMessage<'static>);
    serde_json::json!({
        "$comment": "Generated by `kernelbox schema` from src/api/native/protocol.rs; do not edit.",
        "title": "kernelbox native WebSocket protocol",
        "client_to_server": client,
        "server_to_client": server,
    })
}

/// [`json_schema`] as the pretty-printed text checked in at `protocol/native.schema.json`.
pub fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&json_schema()).unwrap_or_default();
    text.push('\n');
    text
}
