//! Capped exponential backoff for everything that retries a peer: the
//! registration handshake, NetManager's socket, the MQTT broker.

use std::time::Duration;

/// Delays `first`, `2 * first`, `4 * first` ... never more than `cap`;
/// [`Backoff::reset`] starts over once the peer answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        let first = first.min(cap);
        Backoff {
            first,
            next: first,
            cap,
        }
    }

    /// The delay before the next attempt; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.cap);
        d
    }

    /// The peer answered: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps for [`Backoff::next_delay`] and returns how long that was.
    pub async fn wait(&mut self) -> Duration {
        let d = self.next_delay();
        tokio::time::sleep(d).await;
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let d: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
        let mut ms = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let d: Vec<u128> = (0..7).map(|_| ms.next_delay().as_millis()).collect();
        assert_eq!(d, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
    }

    #[test]
    fn first_above_cap_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(9), Duration::from_secs(3));
        assert_eq!(b.next_delay(), Duration::from_secs(3));
        assert_eq!(b.next_delay(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn wait_sleeps_and_advances() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(4));
        let before = tokio::time::Instant::now();
        assert_eq!(b.wait().await, Duration::from_millis(1));
        assert!(before.elapsed() >= Duration::from_millis(1));
        assert_eq!(b.next_delay(), Duration::from_millis(2));
    }
}
