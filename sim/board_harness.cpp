// Simulated board: drives the Verilated top level (ports clk, rx, tx; the design
// makes its own power-on reset, see sim.board.BoardWrapper) and
// connects its UART pins to a pseudo-terminal, so host code opens the printed
// path exactly as it opens /dev/ttyUSB1.
//
// Built by sim/board.py (verilator --cc --exe --build); not meant to be run by hand
// except through `hel sim-board`.
//
//   Vtop --cpb N [--stats] [--poll-cycles N] [--reset-cycles N]
//        [--idle-cycles N] [--lifeline-stdin] [--max-cycles N]
//
// stdout: exactly one line, the pty slave path (then nothing more).
// stderr: "sim-board: stats ..." lines (every second with --stats, on SIGUSR1, on exit).
//
// The UART model is bit-level at the design's clocks per bit (8N1, LSB first,
// idle high). Bytes from the pty are serialised back to back onto rx; tx is sampled
// in the middle of each bit and whole bytes are written to the pty. The pty is
// serviced only every --poll-cycles clock cycles so that system calls cost little
// against the model's evaluation. If the pty cannot take the device's output
// (nobody reading), simulated time stops until it can, so nothing is lost; only
// after 2 s without progress is the backlog dropped (a real UART with nobody
// listening loses it too), so a host blocked writing to us cannot deadlock.

#include "Vtop.h"
#include "verilated.h"

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t g_stop = 0;
static volatile sig_atomic_t g_report = 0;

static void on_stop(int) { g_stop = 1; }
static void on_report(int) { g_report = 1; }

static double now_s() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

[[noreturn]] static void die(const char* what) {
    std::fprintf(stderr, "sim-board: error: %s: %s\n", what, std::strerror(errno));
    std::exit(1);
}

// A byte queue (vector + read index) that is cheap to drain one byte at a time.
struct ByteQueue {
    std::vector<uint8_t> buf;
    size_t head = 0;
    size_t size() const { return buf.size() - head; }
    bool empty() const { return head == buf.size(); }
    uint8_t pop() { return buf[head++]; }
    void compact() {
        if (head == 0) return;
        buf.erase(buf.begin(), buf.begin() + head);
        head = 0;
    }
};

// Host -> device: serialise bytes onto the rx line.
struct RxDriver {
    int cpb;
    int bit = -1;     // -1 idle, 0 start, 1..8 data, 9 stop
    int left = 0;     // cycles left in the current bit
    unsigned data = 0;
    explicit RxDriver(int c) : cpb(c) {}
    bool busy() const { return bit >= 0; }
    // Line level for the next clock cycle.
    inline int step(ByteQueue& q) {
        if (left == 0) {
            if (bit >= 0 && bit < 9) {
                ++bit;
            } else if (!q.empty()) {
                data = q.pop();
                bit = 0;
            } else {
                bit = -1;
                return 1;
            }
            left = cpb;
        }
        --left;
        if (bit == 0) return 0;
        if (bit == 9) return 1;
        return (data >> (bit - 1)) & 1;
    }
};

// Device -> host: sample the tx line in the middle of each bit.
struct TxSampler {
    int cpb;
    int bit = -1;     // -1 idle (waiting for a falling edge), 0 start .. 9 stop, 10 break
    int left = 0;     // cycles to the next sample
    unsigned data = 0;
    uint64_t framing_errors = 0;
    explicit TxSampler(int c) : cpb(c) {}
    bool busy() const { return bit >= 0; }
    // Called once per cycle with the line level after the clock edge.
    inline void step(int line, std::vector<uint8_t>& out) {
        if (bit < 0) {
            if (!line) { bit = 0; left = cpb / 2; }   // this cycle is the start bit's first
            return;
        }
        if (bit == 10) {                             // after a bad stop bit: wait for idle
            if (line) bit = -1;
            return;
        }
        if (left-- != 0) return;
        if (bit == 0) {
            if (line) { bit = -1; return; }          // glitch
            data = 0;
        } else if (bit <= 8) {
            data |= unsigned(line) << (bit - 1);
        } else {
            if (line) {
                out.push_back(uint8_t(data));
                bit = -1;
            } else {
                ++framing_errors;
                bit = 10;
            }
            return;
        }
        ++bit;
        left = cpb - 1;
    }
};

static uint64_t parse_u64(const char* opt, const char* s) {
    char* end = nullptr;
    errno = 0;
    unsigned long long v = std::strtoull(s, &end, 0);
    if (errno || !*s || *end) {
        std::fprintf(stderr, "sim-board: error: bad value for %s: %s\n", opt, s);
        std::exit(2);
    }
    return v;
}

int main(int argc, char** argv) {
    uint64_t cpb = 0, poll_cycles = 512, reset_cycles = 8, idle_cycles = 1ull << 26, max_cycles = 0;
    bool stats = false, lifeline = false;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto val = [&]() -> uint64_t {
            if (i + 1 >= argc) { std::fprintf(stderr, "sim-board: error: %s needs a value\n", a.c_str()); std::exit(2); }
            return parse_u64(a.c_str(), argv[++i]);
        };
        if (a == "--cpb") cpb = val();
        else if (a == "--poll-cycles") poll_cycles = val();
        else if (a == "--reset-cycles") reset_cycles = val();   // the design's power-on reset length
        else if (a == "--idle-cycles") idle_cycles = val();
        else if (a == "--max-cycles") max_cycles = val();
        else if (a == "--stats") stats = true;
        else if (a == "--lifeline-stdin") lifeline = true;
        else { std::fprintf(stderr, "sim-board: error: unknown option %s\n", a.c_str()); return 2; }
    }
    if (cpb < 4 || cpb > 1u << 20) { std::fprintf(stderr, "sim-board: error: --cpb must be in 4..2^20\n"); return 2; }
    if (poll_cycles < 1) poll_cycles = 1;

    // Pseudo-terminal. The slave stays open here too, so the pty survives clients
    // opening and closing it, and it is raw (no echo, no line editing) before any
    // client writes.
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0) die("posix_openpt");
    if (grantpt(master) || unlockpt(master)) die("grantpt/unlockpt");
    const char* name = ptsname(master);
    if (!name) die("ptsname");
    std::string path = name;
    int slave = open(path.c_str(), O_RDWR | O_NOCTTY);
    if (slave < 0) die("open pty slave");
    termios tio;
    if (tcgetattr(slave, &tio)) die("tcgetattr");
    cfmakeraw(&tio);
    if (tcsetattr(slave, TCSANOW, &tio)) die("tcsetattr");
    if (fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK)) die("fcntl");
    if (lifeline && fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK)) die("fcntl stdin");

    struct sigaction sa {};
    sa.sa_handler = on_stop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGHUP, &sa, nullptr);
    sa.sa_handler = on_report;
    sigaction(SIGUSR1, &sa, nullptr);
    signal(SIGPIPE, SIG_IGN);

    std::printf("%s\n", path.c_str());
    std::fflush(stdout);

    auto ctx = std::make_unique<VerilatedContext>();
    auto top = std::make_unique<Vtop>(ctx.get(), "top");

    ByteQueue rxq;                // from the pty, to be serialised
    std::vector<uint8_t> txq;     // deserialised, to be written to the pty
    size_t tx_written = 0;
    RxDriver rxd{int(cpb)};
    TxSampler txs{int(cpb)};
    uint64_t cycles = 0, rx_bytes = 0, tx_bytes = 0, last_activity = 0, stalls = 0, dropped = 0;
    const size_t RX_LOW = 256, RX_CHUNK = 4096, TX_HIGH = 1 << 16;
    const double t0 = now_s();
    double last_stats = t0, drowsy_s = 0;
    std::vector<uint8_t> buf(RX_CHUNK);

    double last_report_t = t0;
    uint64_t last_report_cycles = 0;
    // cycles_per_s: since start; recent_cycles_per_s: since the previous report.
    auto report = [&](const char* when) {
        double t = now_s(), dt = t - t0, dr = t - last_report_t;
        double recent = dr > 0 ? (cycles - last_report_cycles) / dr : 0.0;
        last_report_t = t;
        last_report_cycles = cycles;
        std::fprintf(stderr,
                     "sim-board: stats %s cycles=%llu seconds=%.3f cycles_per_s=%.0f "
                     "recent_cycles_per_s=%.0f rx_bytes=%llu "
                     "tx_bytes=%llu framing_errors=%llu stalls=%llu dropped=%llu drowsy_s=%.3f\n",
                     when, (unsigned long long)cycles, dt, dt > 0 ? cycles / dt : 0.0, recent,
                     (unsigned long long)rx_bytes, (unsigned long long)tx_bytes,
                     (unsigned long long)txs.framing_errors, (unsigned long long)stalls,
                     (unsigned long long)dropped, drowsy_s);
        std::fflush(stderr);
    };

    // The design resets itself (power-on reset inside, as on a real board). Run
    // through it and a few idle cycles with the line high before the first byte
    // from the pty goes out (a start bit during reset would be cut short).
    top->rx = 1;
    top->clk = 1;
    top->eval();
    for (uint64_t i = 0; i < reset_cycles + 16; ++i) {
        top->clk = 0;
        top->eval();
        top->clk = 1;
        top->eval();
        ++cycles;
    }

    while (!g_stop) {
        // ---- pty service, once per batch ----------------------------------------
        if (rxq.size() < RX_LOW) {
            rxq.compact();
            ssize_t n = read(master, buf.data(), buf.size());
            if (n > 0) {
                rxq.buf.insert(rxq.buf.end(), buf.begin(), buf.begin() + n);
                rx_bytes += n;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR && errno != EIO) {
                die("read pty");
            }
        }
        double stall_since = 0;
        while (tx_written < txq.size()) {
            ssize_t n = write(master, txq.data() + tx_written, txq.size() - tx_written);
            if (n > 0) { tx_written += n; stall_since = 0; continue; }
            if (n < 0 && errno != EAGAIN && errno != EINTR) die("write pty");
            if (txq.size() - tx_written < TX_HIGH || g_stop) break;
            // The pty is full and the backlog large: stop time until the host reads.
            // If it does not for 2 s (it may be blocked writing to us), drop the
            // backlog as a real UART with nobody listening would, and go on.
            double t = now_s();
            if (stall_since == 0) { stall_since = t; ++stalls; }
            if (t - stall_since > 2.0) {
                dropped += txq.size() - tx_written;
                std::fprintf(stderr, "sim-board: nobody read the device's output for 2 s: "
                                     "dropped %zu bytes\n", txq.size() - tx_written);
                tx_written = txq.size();
                break;
            }
            pollfd p{master, POLLOUT, 0};
            poll(&p, 1, 20);
        }
        if (tx_written == txq.size() || tx_written > TX_HIGH) {
            txq.erase(txq.begin(), txq.begin() + tx_written);
            tx_written = 0;
        }
        if (lifeline) {
            char c;
            ssize_t n = read(0, &c, 1);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) break;   // parent gone
        }
        if (g_report) { g_report = 0; report("now"); }
        if (stats) {
            double t = now_s();
            if (t - last_stats >= 1.0) { last_stats = t; report("now"); }
        }
        uint64_t batch = poll_cycles;
        // Long quiet on the line (no UART traffic either way for idle_cycles cycles,
        // far longer than any command takes): run slowly, 512 cycles per 1 ms nap on
        // the pty, so host input wakes us at once. A computation still running
        // advances, just without burning a whole core.
        if (idle_cycles && cycles - last_activity > idle_cycles && rxq.empty() &&
            !rxd.busy() && !txs.busy() && txq.empty()) {
            double t = now_s();
            pollfd p{master, POLLIN, 0};
            poll(&p, 1, 1);
            drowsy_s += now_s() - t;
            batch = 512;
        }
        if (max_cycles && cycles + batch > max_cycles) {
            if (cycles >= max_cycles) break;
            batch = max_cycles - cycles;
        }

        // ---- clock ---------------------------------------------------------------
        const size_t tx_before = txq.size();
        const bool line_busy = rxd.busy() || !rxq.empty();
        for (uint64_t i = 0; i < batch; ++i) {
            // Inputs change on the falling edge, half a cycle before they are sampled.
            top->clk = 0;
            top->rx = rxd.step(rxq);
            top->eval();
            top->clk = 1;
            top->eval();
            txs.step(top->tx, txq);
            ++cycles;
        }
        if (line_busy || txq.size() != tx_before || txs.busy()) last_activity = cycles;
        tx_bytes += txq.size() - tx_before;
    }

    // Hand over what the device already sent, briefly, then stop.
    for (int tries = 0; tx_written < txq.size() && tries < 50; ++tries) {
        ssize_t n = write(master, txq.data() + tx_written, txq.size() - tx_written);
        if (n > 0) tx_written += n;
        else { pollfd p{master, POLLOUT, 0}; poll(&p, 1, 10); }
    }
    top->final();
    report("exit");
    close(slave);
    close(master);
    return 0;
}
