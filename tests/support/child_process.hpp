/**
 * Running part of a test in a child process, to watch it die. On Linux the tests fork(); Windows
 * has no fork, so a test program runs itself again with `--membacking-child NAME`, and main()
 * (doctest_main.cpp) runs the child function registered under NAME instead of the tests.
 *
 *   MEMBACKING_CHILD(crash_outside) { ...; }            // at namespace scope
 *   CHECK(test::run_in_child("crash_outside") == STATUS_ACCESS_VIOLATION);
 *
 * A child function that returns exits with 0.
 */
#pragma once

#include <membacking/base/config.hpp>

#include <cstdint>
#include <cstring>
#include <cwchar>
#include <map>
#include <optional>
#include <string>

#if MEMBACKING_OS_WINDOWS
#    include <membacking/os/windows.hpp>
#endif

namespace membacking::test {

using ChildFunction = void (*)();

inline std::map<std::string, ChildFunction>& child_functions()
{
    static std::map<std::string, ChildFunction> registry;
    return registry;
}

struct RegisterChild {
    RegisterChild(const char* name, ChildFunction f) { child_functions()[name] = f; }
};

/// If the command line asks for a child function, runs it and returns the exit code to use.
inline std::optional<int> child_main(int argc, char** argv)
{
    if (argc != 3 || std::strcmp(argv[1], "--membacking-child") != 0)
        return std::nullopt;
    auto it = child_functions().find(argv[2]);
    if (it == child_functions().end())
        return 99;
    it->second();
    return 0;
}

#if MEMBACKING_OS_WINDOWS
/// This process's environment as a CreateProcessW block, with the variable `assignment`
/// ("NAME=value") replacing any variable of that name.
inline std::wstring environment_with(const std::wstring& assignment)
{
    const std::wstring name = assignment.substr(0, assignment.find(L'=') + 1);
    std::wstring block;
    if (wchar_t* env = ::GetEnvironmentStringsW()) {
        for (const wchar_t* var = env; *var != L'\0'; var += std::wcslen(var) + 1)
            if (std::wcsncmp(var, name.c_str(), name.size()) != 0)
                block.append(var).push_back(L'\0');
        ::FreeEnvironmentStringsW(env);
    }
    block.append(assignment).push_back(L'\0');
    block.push_back(L'\0');
    return block;
}

/// Runs this program's child function `name` in a new process (with `assignment`, "NAME=value",
/// added to its environment if given); returns its exit code (an NTSTATUS such as
/// STATUS_ACCESS_VIOLATION if it died of an exception), or nullopt if it could not be started or
/// waited for.
inline std::optional<std::uint32_t> run_in_child(const char* name,
                                                 const wchar_t* assignment = nullptr)
{
    wchar_t path[MAX_PATH];
    const DWORD n = ::GetModuleFileNameW(nullptr, path, MAX_PATH);
    if (n == 0 || n == MAX_PATH)
        return std::nullopt;
    std::wstring cmd = L"\"" + std::wstring(path) + L"\" --membacking-child ";
    for (const char* c = name; *c != '\0'; ++c)
        cmd.push_back(static_cast<wchar_t>(*c));
    std::wstring env;
    if (assignment != nullptr)
        env = environment_with(assignment);
    STARTUPINFOW si{};
    si.cb = sizeof(si);
    PROCESS_INFORMATION pi{};
    if (!::CreateProcessW(path, cmd.data(), nullptr, nullptr, FALSE, CREATE_UNICODE_ENVIRONMENT,
                          env.empty() ? nullptr : env.data(), nullptr, &si, &pi))
        return std::nullopt;
    ::CloseHandle(pi.hThread);
    std::optional<std::uint32_t> code;
    DWORD status = 0;
    if (::WaitForSingleObject(pi.hProcess, INFINITE) == WAIT_OBJECT_0 &&
        ::GetExitCodeProcess(pi.hProcess, &status))
        code = static_cast<std::uint32_t>(status);
    ::CloseHandle(pi.hProcess);
    return code;
}
#endif

} // namespace membacking::test

#define MEMBACKING_CHILD(name)                                                                     \
    static void name();                                                                            \
    static const ::membacking::test::RegisterChild name##_registration(#name, &name);              \
    static void name()
