/**
 * X86Asm: the few 32-bit x86 instructions the example and test guests use, encoded by hand, with
 * labels and 8-bit relative jumps. Guests run in flat 32-bit protected mode without paging
 * (see kvm_vcpu.hpp), so every address below is a guest physical address.
 *
 * Not part of the library: guest code is the VMM's business; this is example/test support.
 */
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace membacking::example {

class X86Asm {
public:
    enum Reg : std::uint8_t {
        eax = 0,
        ecx = 1,
        edx = 2,
        ebx = 3,
        esp = 4,
        ebp = 5,
        esi = 6,
        edi = 7
    };

    X86Asm& mov(Reg r, std::uint32_t imm) { return op(0xb8 + r).imm32(imm); }   // mov r32, imm32
    X86Asm& load_al(std::uint32_t addr) { return op(0xa0).imm32(addr); }        // mov al, [addr]
    X86Asm& store_al(std::uint32_t addr) { return op(0xa2).imm32(addr); }       // mov [addr], al
    X86Asm& load_eax(std::uint32_t addr) { return op(0xa1).imm32(addr); }       // mov eax, [addr]
    X86Asm& store_eax(std::uint32_t addr) { return op(0xa3).imm32(addr); }      // mov [addr], eax
    X86Asm& load_al_esi() { return op(0x8a).op(0x06); }                         // mov al, [esi]
    X86Asm& add_eax_esi() { return op(0x03).op(0x06); }                         // add eax, [esi]
    X86Asm& store_byte_edi(std::uint8_t v) { return op(0xc6).op(0x07).op(v); }  // mov byte [edi], v
    X86Asm& add_esi(std::uint8_t imm) { return op(0x83).op(0xc6).op(imm); }     // add esi, imm8
    X86Asm& add_edi(std::uint32_t imm) { return op(0x81).op(0xc7).imm32(imm); } // add edi, imm32
    X86Asm& inc_dword_edi() { return op(0xff).op(0x07); }                       // inc dword [edi]
    X86Asm& imul_eax(std::uint8_t imm) { return op(0x6b).op(0xc0).op(imm); } // imul eax, eax, imm8
    X86Asm& add_eax(std::uint32_t imm) { return op(0x05).imm32(imm); }       // add eax, imm32
    X86Asm& test_al() { return op(0x84).op(0xc0); }                          // test al, al
    X86Asm& cmp_al(std::uint8_t imm) { return op(0x3c).op(imm); }            // cmp al, imm8
    X86Asm& inc_esi() { return op(0x46); }
    X86Asm& dec_ecx() { return op(0x49); }
    X86Asm& hlt() { return op(0xf4); }
    X86Asm& jz(const std::string& l) { return jump(0x74, l); }
    X86Asm& jnz(const std::string& l) { return jump(0x75, l); }
    X86Asm& jmp(const std::string& l) { return jump(0xeb, l); }

    X86Asm& label(const std::string& name)
    {
        labels_[name] = code_.size();
        return *this;
    }

    /// The machine code, jumps resolved.
    [[nodiscard]] std::vector<std::uint8_t> code() const
    {
        std::vector<std::uint8_t> out = code_;
        for (const auto& [at, name] : fixups_) {
            const auto target = static_cast<long>(labels_.at(name));
            const long rel = target - static_cast<long>(at + 1);
            if (rel < -128 || rel > 127)
                throw std::logic_error("guest jump to '" + name + "' out of rel8 range");
            out[at] = static_cast<std::uint8_t>(static_cast<std::int8_t>(rel));
        }
        return out;
    }

private:
    X86Asm& op(unsigned byte)
    {
        code_.push_back(static_cast<std::uint8_t>(byte));
        return *this;
    }
    X86Asm& imm32(std::uint32_t v)
    {
        for (int i = 0; i < 4; ++i)
            code_.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
        return *this;
    }
    X86Asm& jump(unsigned opcode, const std::string& l)
    {
        op(opcode);
        fixups_.emplace_back(code_.size(), l);
        return op(0);
    }

    std::vector<std::uint8_t> code_;
    std::map<std::string, std::size_t> labels_;
    std::vector<std::pair<std::size_t, std::string>> fixups_;
};

} // namespace membacking::example
