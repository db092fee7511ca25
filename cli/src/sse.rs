//! The `text/event-stream` format (Server-Sent Events), as the API's event routes
//! send it: what `swarm task logs -f` and `swarm status --watch` read.

/// One Server-Sent Event.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Splits a byte stream into events (the `text/event-stream` format: `field: value`
/// lines, events ended by a blank line, `:` comments ignored).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    current: SseEvent,
}

impl SseParser {
    /// Feed the next bytes of the stream; returns the events they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                let ev = std::mem::take(&mut self.current);
                if !ev.data.is_empty() || !ev.event.is_empty() {
                    out.push(ev);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.current.event = value.to_string(),
                "id" => self.current.id = Some(value.to_string()),
                "data" => {
                    if !self.current.data.is_empty() {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_pieces_are_put_together() {
        let text = ": keep-alive\n\nevent: output\nid: 1:5\ndata: {\"text\":\"hi\"}\n\nevent: end\r\ndata: {}\r\n\r\n";
        for cut in 0..text.len() {
            let mut p = SseParser::default();
            let mut evs = p.push(&text.as_bytes()[..cut]);
            evs.extend(p.push(&text.as_bytes()[cut..]));
            assert_eq!(
                evs,
                vec![
                    SseEvent {
                        event: "output".into(),
                        id: Some("1:5".into()),
                        data: "{\"text\":\"hi\"}".into()
                    },
                    SseEvent {
                        event: "end".into(),
                        id: None,
                        data: "{}".into()
                    }
                ],
                "cut at {cut}"
            );
        }
    }
}
