/**
 * Both sides of the line protocol between a test or benchmark process and the helper process it
 * spawns (tests/ipc/helper.cpp, bench/remote_worker.cpp): one command a line in, one answer a
 * line out, over a socket the parent passed as a file descriptor. The child's side: read_line,
 * write_line; the parent's (tests/ipc/remote.cpp, bench/remote.cpp): ask, read_answer. No doctest
 * here: the children are plain programs, and each parent reports a failure its own way.
 */
#pragma once

#include <cstdlib>
#include <optional>
#include <poll.h>
#include <string>
#include <string_view>
#include <sys/types.h>
#include <unistd.h>

namespace membacking::test {

/// Reads one line from `fd` into `line` (without its '\n'). False at end of file or on an error:
/// the parent is gone, or has nothing more to say.
inline bool read_line(int fd, std::string& line)
{
    line.clear();
    char c = 0;
    while (::read(fd, &c, 1) == 1) {
        if (c == '\n')
            return true;
        line.push_back(c);
    }
    return false;
}

/// Writes `s` and a '\n' to `fd` in one write. A parent that is gone ends the process (exit
/// code 3): nobody is left to answer.
inline void write_line(int fd, std::string_view s)
{
    std::string line(s);
    line += '\n';
    if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
        std::_Exit(3);
}

/// The parent's side: reads the child's answer line from `fd` (without its '\n'), waiting at
/// most `timeout_ms` for each byte (negative: as long as it takes, with no poll). nullopt if the
/// wait timed out, the read failed, or the child closed its end before a whole line.
inline std::optional<std::string> read_answer(int fd, int timeout_ms = -1)
{
    std::string out;
    for (;;) {
        if (timeout_ms >= 0) {
            pollfd p{fd, POLLIN, 0};
            if (::poll(&p, 1, timeout_ms) != 1)
                return std::nullopt;
        }
        char c = 0;
        if (::read(fd, &c, 1) != 1)
            return std::nullopt;
        if (c == '\n')
            return out;
        out.push_back(c);
    }
}

/// The parent's side: sends `command` and a '\n' to `fd` in one write, then reads the answer
/// (read_answer). nullopt if the write failed, or as read_answer.
inline std::optional<std::string> ask(int fd, std::string_view command, int timeout_ms = -1)
{
    std::string line(command);
    line += '\n';
    if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
        return std::nullopt;
    return read_answer(fd, timeout_ms);
}

} // namespace membacking::test
