// What this CPU and its operating system can execute, from cpuid and xgetbv: compiled for the
// architecture's baseline (no -m flags), so that it runs on every CPU of the architecture and
// answers before any ISA-specific library is loaded (wcdm_jax/native_build.py).
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

extern "C" {

// Bit 0: AVX2 and FMA usable (the CPU has them and the OS saves the YMM state); bit 1: AVX-512F
// usable (also the opmask and ZMM state). 0 on other architectures (the portable kernels only).
int WcdmCpuFeatures() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  const bool fma = ecx & (1u << 12), osxsave = ecx & (1u << 27), avx = ecx & (1u << 28);
  if (!(osxsave && avx)) return 0;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6) != 0x6) return 0;  // the OS saves the SSE and AVX state
  if (__get_cpuid_max(0, nullptr) < 7) return 0;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool avx2 = ebx & (1u << 5), avx512f = ebx & (1u << 16);
  int features = (avx2 && fma) ? 1 : 0;
  if (features && avx512f && (xcr0_lo & 0xe0) == 0xe0) features |= 2;  // opmask, ZMM state
  return features;
#else
  return 0;
#endif
}

}  // extern "C"
