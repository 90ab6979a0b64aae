//! A reader that runs its source on another thread, so decompressing and writing files use
//! both cores (as `dpkg-deb -x` does with its two processes).

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver};

/// Bytes handed over per message.
const CHUNK: usize = 256 * 1024;
/// Messages in flight.
const DEPTH: usize = 8;

/// Runs `consume` on a reader fed by `source`, which is read on a scoped thread.
pub(crate) fn pipelined<R, T>(source: R, consume: impl FnOnce(&mut dyn Read) -> T) -> T
where
    R: Read + Send,
{
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(DEPTH);
        scope.spawn(move || {
            let mut source = source;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let msg = match read_full(&mut source, &mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(buf)
                    }
                    Err(e) => Err(e),
                };
                let failed = msg.is_err();
                // A send error means the consumer stopped early; so do we.
                if tx.send(msg).is_err() || failed {
                    return;
                }
            }
        });
        let mut reader = ChannelReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
        };
        consume(&mut reader)
    })
}

struct ChannelReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0), // the source ended
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// An xz decoder that uses every core when the stream has several blocks (as dpkg-deb's
/// output does), and one when the library cannot.
pub(crate) fn xz_reader<R: Read>(compressed: R) -> io::Result<liblzma::read::XzDecoder<R>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = u32::try_from(threads).unwrap_or(1);
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads)
        .memlimit_stop(u64::MAX)
        .decoder()
        .or_else(|_| liblzma::stream::Stream::new_stream_decoder(u64::MAX, 0))?;
    Ok(liblzma::read::XzDecoder::new_stream(compressed, stream))
}

/// Reads until `buf` is full or the data ends.
pub(crate) fn read_full(data: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match data.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_everything_through() {
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let out = pipelined(&data[..], |r| {
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            out
        });
        assert_eq!(out, data);
    }

    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("corrupt stream"));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn errors_reach_the_consumer_and_early_stop_is_fine() {
        let err = pipelined(Failing(CHUNK + 5), |r| r.read_to_end(&mut Vec::new())).unwrap_err();
        assert_eq!(err.to_string(), "corrupt stream");
        // The consumer reads a little and leaves; the source thread must not hang.
        let n = pipelined(&vec![0u8; 20 * CHUNK][..], |r| {
            r.read(&mut [0u8; 10]).unwrap()
        });
        assert_eq!(n, 10);
    }
}
