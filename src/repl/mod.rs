//! `kernelbox repl`: an interactive terminal client of a kernelbox server. It reads code with
//! line editing and history, asks the kernel (`is_complete`) whether Enter runs the code or
//! continues it on another line, streams output as it arrives, shows errors in colour, saves
//! images to files, and turns Ctrl-C into an interrupt of the running cell (a second Ctrl-C at an
//! empty prompt exits). `%restart`, `%interrupt`, `%quit` and `%help` are its own commands.

mod client;
mod lines;

use std::io::Write;
use std::path::PathBuf;

use base64::Engine;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

use client::Connection;
pub use client::{ClientError, Server};
use lines::{Line, Lines};

/// How the REPL was asked to run.
#[derive(Debug, Clone)]
pub struct ReplOptions {
    /// The server's base URL.
    pub url: String,
    /// The API token.
    pub token: String,
    /// Reopen this session instead of starting one.
    pub session: Option<String>,
    /// Where images are saved (default: a temporary directory per session).
    pub image_dir: Option<PathBuf>,
    /// Keep the session when the REPL exits (it is deleted otherwise, unless it was reopened).
    pub keep: bool,
}

/// Why the REPL stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// Talking to the server failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The terminal could not be used.
    #[error("terminal: {0}")]
    Terminal(String),
}

const HELP: &str = "\
Enter runs the code when it is complete (the kernel decides); an empty line ends a block.
Ctrl-C interrupts the running cell; at an empty prompt, twice, it exits. Ctrl-D exits.
  %restart    restart the kernel (variables are lost)
  %interrupt  interrupt the kernel
  %quit       exit (also: exit, quit)
  %help       this text";

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Runs the REPL until the user exits.
pub async fn run(options: ReplOptions) -> Result<(), ReplError> {
    let server = Server::new(&options.url, &options.token);
    let (session, created) = match &options.session {
        Some(id) => {
            server.check_session(id).await?;
            (id.clone(), false)
        }
        None => (server.create_session().await?, true),
    };
    let image_dir = options.image_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "kernelbox-repl-{}",
            &session[..8.min(session.len())]
        ))
    });
    let history =
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".kernelbox_history"));
    let lines = Lines::start(history).map_err(|e| ReplError::Terminal(e.to_string()))?;
    let mut interrupts =
        signal(SignalKind::interrupt()).map_err(|e| ReplError::Terminal(e.to_string()))?;
    let connection = client::connect(server.clone(), session.clone()).await?;
    println!(
        "kernelbox {} — session {session}\n{DIM}%help for commands; Ctrl-D or %quit exits{RESET}",
        options.url
    );
    let mut repl = Repl {
        connection,
        lines,
        image_dir,
        images: 0,
        counter: 0,
        execution_count: 1,
        kernel_state: "starting".to_owned(),
    };
    repl.wait_ready().await;
    repl.main_loop(&mut interrupts).await;
    if created && !options.keep {
        let _ = server.delete_session(&session).await;
    } else {
        println!("{DIM}session {session} kept; reopen it with --session {session}{RESET}");
    }
    Ok(())
}

struct Repl {
    connection: Connection,
    lines: Lines,
    image_dir: PathBuf,
    images: usize,
    counter: usize,
    execution_count: i64,
    kernel_state: String,
}

/// How a cell run ended.
enum Ran {
    Done,
    ConnectionLost,
}

impl Repl {
    fn next_id(&mut self, kind: &str) -> String {
        self.counter += 1;
        format!("{kind}{}", self.counter)
    }

    async fn send(&self, message: Value) {
        let _ = self.connection.outgoing.send(message).await;
    }

    /// Waits until the kernel is idle (or dead) after connecting.
    async fn wait_ready(&mut self) {
        while self.kernel_state == "starting" || self.kernel_state == "restarting" {
            match self.connection.events.recv().await {
                Some(event) => self.on_background(&event),
                None => return,
            }
        }
    }

    /// Notes kernel state changes; reports deaths.
    fn on_background(&mut self, event: &Value) {
        if event["type"] == "kernel"
            && let Some(state) = event["state"].as_str()
        {
            self.kernel_state = state.to_owned();
            if state == "dead" {
                let reason = event["reason"].as_str().unwrap_or("unknown reason");
                println!("{RED}kernel died: {reason}{RESET} — %restart starts a new one");
            }
        }
    }

    async fn main_loop(&mut self, interrupts: &mut tokio::signal::unix::Signal) {
        let mut interrupted_once = false;
        loop {
            let prompt = format!("{GREEN}In [{}]:{RESET} ", self.execution_count);
            let first = match self.lines.read(&prompt, "", true).await {
                Line::Text(text) => text,
                Line::Interrupted => {
                    if interrupted_once {
                        return;
                    }
                    interrupted_once = true;
                    println!("{DIM}(Ctrl-C again to exit){RESET}");
                    continue;
                }
                Line::Eof => return,
            };
            interrupted_once = false;
            let trimmed = first.trim();
            if trimmed.is_empty() {
                continue;
            }
            match trimmed {
                "%quit" | "exit" | "quit" | "exit()" | "quit()" => return,
                "%help" => {
                    println!("{HELP}");
                    continue;
                }
                "%restart" => {
                    self.restart().await;
                    continue;
                }
                "%interrupt" => {
                    self.send(json!({"type": "interrupt"})).await;
                    continue;
                }
                _ => {}
            }
            let Some(code) = self.read_block(first).await else {
                continue;
            };
            if let Ran::ConnectionLost = self.run_cell(&code, interrupts).await {
                println!("{RED}the connection to the server is lost{RESET}");
                return;
            }
        }
    }

    /// Reads continuation lines while the kernel says the code is incomplete. `None` when the
    /// user pressed Ctrl-C to drop the block.
    async fn read_block(&mut self, first: String) -> Option<String> {
        let mut code = first;
        loop {
            let (status, indent) = self.is_complete(&code).await;
            if status != "incomplete" {
                return Some(code);
            }
            let prompt = format!(
                "{GREEN}{:>width$}{RESET} ",
                "...:",
                width = 4 + digits(self.execution_count) + 3
            );
            match self.lines.read(&prompt, &indent, true).await {
                Line::Text(line) if line.trim().is_empty() => return Some(code),
                Line::Text(line) => {
                    code.push('\n');
                    code.push_str(&line);
                }
                Line::Interrupted => return None,
                Line::Eof => return Some(code),
            }
        }
    }

    async fn is_complete(&mut self, code: &str) -> (String, String) {
        let id = self.next_id("ic");
        self.send(json!({"type": "is_complete", "id": id, "code": code}))
            .await;
        let wait = async {
            while let Some(event) = self.connection.events.recv().await {
                if event["id"] == id.as_str() {
                    if event["type"] == "is_complete_reply" {
                        return (
                            event["status"].as_str().unwrap_or("unknown").to_owned(),
                            event["indent"].as_str().unwrap_or("").to_owned(),
                        );
                    }
                    // Rejected (kernel dead or busy elsewhere): just run what we have.
                    return ("unknown".to_owned(), String::new());
                }
                self.on_background(&event);
            }
            ("unknown".to_owned(), String::new())
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), wait)
            .await
            .unwrap_or_else(|_| ("unknown".to_owned(), String::new()))
    }

    async fn restart(&mut self) {
        self.send(json!({"type": "restart"})).await;
        self.kernel_state = "restarting".to_owned();
        self.wait_ready().await;
        self.execution_count = 1;
        println!("{DIM}kernel restarted ({}){RESET}", self.kernel_state);
    }

    async fn run_cell(&mut self, code: &str, interrupts: &mut tokio::signal::unix::Signal) -> Ran {
        let id = self.next_id("c");
        self.send(json!({"type": "execute", "id": id, "code": code}))
            .await;
        loop {
            let event = tokio::select! {
                event = self.connection.events.recv() => match event {
                    Some(event) => event,
                    None => return Ran::ConnectionLost,
                },
                _ = interrupts.recv() => {
                    println!("{DIM}^C interrupting…{RESET}");
                    self.send(json!({"type": "interrupt"})).await;
                    continue;
                }
            };
            if event["id"] != id.as_str() {
                self.on_background(&event);
                continue;
            }
            match event["type"].as_str().unwrap_or("") {
                "stream" => {
                    let text = event["text"].as_str().unwrap_or("");
                    if event["name"] == "stderr" {
                        eprint!("{RED}{text}{RESET}");
                        let _ = std::io::stderr().flush();
                    } else {
                        print!("{text}");
                        let _ = std::io::stdout().flush();
                    }
                }
                "execute_result" => {
                    let n = event["execution_count"]
                        .as_i64()
                        .unwrap_or(self.execution_count);
                    let shown = self.show_data(&event["data"]);
                    println!("{RED}Out[{n}]:{RESET} {shown}");
                }
                "display_data" | "update_display_data" => {
                    let shown = self.show_data(&event["data"]);
                    println!("{shown}");
                }
                "error" => {
                    if let Some(lines) = event["traceback"].as_array().filter(|l| !l.is_empty()) {
                        for line in lines {
                            eprintln!("{}", line.as_str().unwrap_or(""));
                        }
                    } else {
                        eprintln!(
                            "{RED}{}: {}{RESET}",
                            event["ename"].as_str().unwrap_or("Error"),
                            event["evalue"].as_str().unwrap_or("")
                        );
                    }
                }
                "input_request" => {
                    let prompt = event["prompt"].as_str().unwrap_or("");
                    let value = match self.lines.read(prompt, "", false).await {
                        Line::Text(text) => text,
                        Line::Interrupted => {
                            self.send(json!({"type": "interrupt"})).await;
                            String::new()
                        }
                        Line::Eof => String::new(),
                    };
                    self.send(json!({"type": "input_reply", "value": value}))
                        .await;
                }
                "done" => {
                    if let Some(n) = event["execution_count"].as_i64() {
                        self.execution_count = n + 1;
                    }
                    match event["status"].as_str() {
                        Some("aborted") => println!("{RED}(the cell was aborted){RESET}"),
                        Some("timeout") => println!("{RED}(the cell timed out){RESET}"),
                        _ => {}
                    }
                    return Ran::Done;
                }
                _ => {}
            }
        }
    }

    /// The text to print for a MIME bundle; images are saved to files and their path shown.
    fn show_data(&mut self, data: &Value) -> String {
        for (mime, ext) in [
            ("image/png", "png"),
            ("image/jpeg", "jpg"),
            ("image/svg+xml", "svg"),
        ] {
            let Some(content) = data[mime].as_str() else {
                continue;
            };
            let bytes = if ext == "svg" {
                Ok(content.as_bytes().to_vec())
            } else {
                base64::engine::general_purpose::STANDARD.decode(content.trim())
            };
            let Ok(bytes) = bytes else {
                return format!("[{mime}: undecodable]");
            };
            self.images += 1;
            let path = self.image_dir.join(format!("image-{}.{ext}", self.images));
            let saved = std::fs::create_dir_all(&self.image_dir)
                .and_then(|()| std::fs::write(&path, &bytes));
            return match saved {
                Ok(()) => format!("[{mime} saved to {}]", path.display()),
                Err(e) => format!("[{mime}: cannot save to {}: {e}]", path.display()),
            };
        }
        data["text/plain"]
            .as_str()
            .map_or_else(|| format!("[{}]", mime_list(data)), str::to_owned)
    }
}

fn mime_list(data: &Value) -> String {
    data.as_object()
        .map(|m| m.keys().cloned().collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

fn digits(n: i64) -> usize {
    n.max(1).to_string().len()
}
