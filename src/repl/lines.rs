//! Line editing for the REPL: rustyline (history, editing keys) on its own thread, asked for one
//! line at a time from async code. The terminal is in raw mode only while a line is being read,
//! so Ctrl-C at a prompt is a key (reported as [`Line::Interrupted`]) and Ctrl-C while a cell
//! runs is a SIGINT the REPL turns into an interrupt.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;

use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use tokio::sync::oneshot;

/// What reading a line gave.
#[derive(Debug)]
pub enum Line {
    /// A line (without its newline).
    Text(String),
    /// Ctrl-C at the prompt.
    Interrupted,
    /// Ctrl-D on an empty line, or the input closed.
    Eof,
}

struct Ask {
    prompt: String,
    initial: String,
    remember: bool,
    reply: oneshot::Sender<Line>,
}

/// The line reader: a handle to the editor's thread.
pub struct Lines {
    asks: std_mpsc::Sender<Ask>,
}

impl Lines {
    /// Starts the editor thread; history is loaded from and saved to `history` when given.
    pub fn start(history: Option<PathBuf>) -> Result<Self, ReadlineError> {
        let mut editor = DefaultEditor::new()?;
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        let (asks, rx) = std_mpsc::channel::<Ask>();
        std::thread::spawn(move || {
            while let Ok(ask) = rx.recv() {
                let line = match editor.readline_with_initial(&ask.prompt, (&ask.initial, "")) {
                    Ok(text) => {
                        if ask.remember && !text.trim().is_empty() {
                            let _ = editor.add_history_entry(text.as_str());
                        }
                        Line::Text(text)
                    }
                    Err(ReadlineError::Interrupted) => Line::Interrupted,
                    Err(_) => Line::Eof,
                };
                let _ = ask.reply.send(line);
            }
            if let Some(path) = &history {
                let _ = editor.save_history(path);
            }
        });
        Ok(Self { asks })
    }

    /// Reads one line after `prompt`, pre-filled with `initial`. Lines typed at code prompts are
    /// kept in the history (`remember`); answers to `input()` are not.
    pub async fn read(&self, prompt: &str, initial: &str, remember: bool) -> Line {
        let (reply, rx) = oneshot::channel();
        let ask = Ask {
            prompt: prompt.to_owned(),
            initial: initial.to_owned(),
            remember,
            reply,
        };
        if self.asks.send(ask).is_err() {
            return Line::Eof;
        }
        rx.await.unwrap_or(Line::Eof)
    }
}
