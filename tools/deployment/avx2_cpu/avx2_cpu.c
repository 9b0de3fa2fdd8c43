/* Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
 *
 * LD_PRELOAD library: the process sees this x86-64 CPU as an AVX2-only one.
 *
 * Every library picks its kernels from the CPUID instruction (PyTorch's
 * cpuinfo, MKL, oneDNN, ONNX Runtime's MLAS, OpenVINO, mmbhvit's own
 * kernels), and not all of them have a switch to stay below AVX-512 (ONNX
 * Runtime has none). Linux can make CPUID fault in user space (arch_prctl
 * ARCH_SET_CPUID, on CPUs with the cpuid_fault flag, KVM guests included):
 * the constructor below turns that on for the process (threads and forks
 * inherit it; execve resets it, and LD_PRELOAD applies this library again),
 * and the SIGSEGV handler answers each CPUID with the real values minus
 * the AVX-512 family, AVX-VNNI / AVX-IFMA / AVX-NE-CONVERT / AVX-VNNI-INT8,
 * AMX and AVX10, then steps over the instruction. Any other SIGSEGV goes to
 * the handler that was there before (by default: the process dies as it
 * would have).
 *
 * Only what CPUID reports changes: the instructions still execute if a
 * program uses them without asking, and the core is still this one (ports,
 * caches, clock). Launcher and checks: tools/deployment/as_avx2_cpu.py.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static struct sigaction g_previous;

static long cpuid_enabled(int on) {
  return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on);
}

/* Clear the feature bits of an AVX2-only CPU's answer to (leaf, sub). */
static void hide_features(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
  if (leaf == 7 && sub == 0) {
    /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
    r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) |
              BIT(30) | BIT(31));
    /* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
    r[2] &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
    /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16,
       AMX-TILE, AMX-INT8 */
    r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) |
              BIT(25));
  } else if (leaf == 7 && sub == 1) {
    /* EAX: AVX-VNNI, AVX512_BF16, AMX-FP16, AVX-IFMA */
    r[0] &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));
    /* EDX: AVX-VNNI-INT8, AVX-NE-CONVERT, AVX10 */
    r[3] &= ~(BIT(4) | BIT(5) | BIT(19));
  } else if (leaf == 0xd && sub == 0) {
    /* EAX: the opmask / ZMM and AMX tile state components */
    r[0] &= ~(BIT(5) | BIT(6) | BIT(7) | BIT(17) | BIT(18));
  }
}

static void on_segv(int sig, siginfo_t* info, void* context) {
  greg_t* reg = ((ucontext_t*)context)->uc_mcontext.gregs;
  const unsigned char* ip = (const unsigned char*)reg[REG_RIP];
  (void)sig;
  (void)info;
  if (ip != NULL && ip[0] == 0x0f && ip[1] == 0xa2) { /* cpuid */
    uint32_t r[4];
    const uint32_t leaf = (uint32_t)reg[REG_RAX], sub = (uint32_t)reg[REG_RCX];
    cpuid_enabled(1); /* this thread only, while it asks */
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    cpuid_enabled(0);
    hide_features(leaf, sub, r);
    reg[REG_RAX] = r[0];
    reg[REG_RBX] = r[1];
    reg[REG_RCX] = r[2];
    reg[REG_RDX] = r[3];
    reg[REG_RIP] += 2;
    return;
  }
  /* a genuine fault: re-run the instruction under the previous handler */
  sigaction(SIGSEGV, &g_previous, NULL);
}

__attribute__((constructor)) static void start_masking(void) {
  static const char failed[] =
      "mmbhvit avx2_cpu: this CPU or kernel cannot make CPUID fault "
      "(arch_prctl ARCH_SET_CPUID; /proc/cpuinfo lacks cpuid_fault), so the "
      "AVX2-only view is impossible here; stopping instead of running with "
      "the full instruction set\n";
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_previous);
  if (cpuid_enabled(0) != 0) {
    if (write(2, failed, sizeof failed - 1) < 0) {
    }
    _exit(3);
  }
  /* read by mmbhvit.utils.sysinfo (with a check that this library is
     mapped) to describe the CPU as the programs see it */
  setenv("MMBHVIT_CPUID_VIEW", "avx2", 1);
}
