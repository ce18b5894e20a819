//! `kernelbox repl` driven through a real pseudo-terminal, as a person types into it, against a
//! real server and kernel.

mod common;

use std::time::Duration;

use expectrl::{ControlCode, Eof, Expect, Regex, Session};

fn repl(
    url: &str,
    token: &str,
    image_dir: &std::path::Path,
    home: &std::path::Path,
) -> impl Expect {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kernelbox"));
    command
        .arg("repl")
        .arg(url)
        .arg("--token")
        .arg(token)
        .arg("--image-dir")
        .arg(image_dir)
        .env("TERM", "xterm-256color")
        .env("HOME", home);
    let mut session = Session::spawn(command).expect("spawn the repl in a pty");
    session.set_expect_timeout(Some(Duration::from_secs(60)));
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_at_the_repl_runs_cells_interrupts_and_restarts() {
    let server = common::TestServer::local().await;
    let url = format!("http://{}", server.addr);
    let token = server.token.clone();
    let dir = common::temp_state_dir();
    let sessions = server.sessions.clone();
    let images = dir.join("images");
    tokio::task::spawn_blocking(move || {
        let mut p = repl(&url, &token, &images, &dir);
        p.expect("In [1]:").expect("first prompt");
        p.send_line("x = 41").unwrap();
        p.expect("In [2]:").unwrap();
        p.send_line("x + 1").unwrap();
        p.expect(Regex(r"Out\[2\]:.*42")).expect("the result");

        // A block: the kernel says `for …:` is incomplete, an empty line ends it.
        p.send_line("for i in range(3):").unwrap();
        p.expect("...:").expect("a continuation prompt");
        p.send_line("print(i * 10)").unwrap();
        p.expect("...:").unwrap();
        p.send_line("").unwrap();
        p.expect("0\r\n10\r\n20").expect("the block ran");

        // Ctrl-C while a cell runs interrupts it; the variables stay.
        p.send_line("import time; time.sleep(30)").unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        p.send(ControlCode::EndOfText).unwrap();
        p.expect("KeyboardInterrupt").expect("the interrupt");
        p.send_line("x").unwrap();
        p.expect(Regex(r"Out\[\d+\]:.*41")).unwrap();

        // Errors and images.
        p.send_line("1/0").unwrap();
        p.expect("ZeroDivisionError").unwrap();
        p.send_line("import matplotlib.pyplot as plt; plt.plot([1, 4, 9]); plt.show()")
            .unwrap();
        let saved = p
            .expect(Regex(r"image/png saved to (\S+\.png)"))
            .expect("the image is saved");
        let path = String::from_utf8_lossy(saved.get(1).expect("path")).into_owned();
        let png = std::fs::read(&path).expect("the saved image");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{path} is a PNG");

        // input() is answered at the terminal.
        p.send_line("input('name? ')").unwrap();
        p.expect("name? ").unwrap();
        p.send_line("ada").unwrap();
        p.expect("'ada'").unwrap();

        // %restart drops the variables.
        p.send_line("%restart").unwrap();
        p.expect("kernel restarted").unwrap();
        p.send_line("x").unwrap();
        p.expect("NameError").unwrap();

        // Ctrl-C twice at an empty prompt exits.
        p.expect("In [").unwrap();
        p.send(ControlCode::EndOfText).unwrap();
        p.expect("Ctrl-C again to exit").unwrap();
        p.send(ControlCode::EndOfText).unwrap();
        p.expect(Eof).expect("the repl exits");
    })
    .await
    .expect("repl session");
    // The session the REPL started is gone with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sessions.list().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        sessions.list().is_empty(),
        "the REPL's session was deleted on exit"
    );
    server.stop().await;
}
