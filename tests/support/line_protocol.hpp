/**
 * The child's side of the line protocol between a test or benchmark process and the helper
 * process it spawns (tests/ipc/helper.cpp, bench/remote_worker.cpp): one command a line in, one
 * answer a line out, over a socket the parent passed as a file descriptor. No doctest here: the
 * children are plain programs.
 */
#pragma once

#include <cstdlib>
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

} // namespace membacking::test
