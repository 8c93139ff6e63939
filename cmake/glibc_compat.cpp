// Linked into both libraries when SAFESHAPE_GLIBC_COMPAT is ON (Linux x86_64, the default), so they load on
// glibc 2.28 (RHEL/Rocky 8; torch's manylinux_2_28 wheels) even when built on a newer glibc. Only three symbols
// of ours are newer than 2.28; auditwheel show checks the result (scripts/build_wheels.sh).
extern "C" {
// libstdc++'s headers (GCC >= 11) read __libc_single_threaded (glibc 2.32) to skip atomics in shared_ptr etc.
// This hidden definition keeps the reference inside the library; 0 means "maybe threaded": always the atomic path.
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

// exp and log got new symbol versions in glibc 2.29 (the same functions without the old SVID error handling).
// The linker routes every call of ours (-Wl,--wrap=exp,--wrap=log) to the versions every glibc since 2.2.5 has.
double safeshape_glibc225_exp(double);
double safeshape_glibc225_log(double);
__asm__(".symver safeshape_glibc225_exp,exp@GLIBC_2.2.5");
__asm__(".symver safeshape_glibc225_log,log@GLIBC_2.2.5");
__attribute__((visibility("hidden"))) double __wrap_exp(double x) { return safeshape_glibc225_exp(x); }
__attribute__((visibility("hidden"))) double __wrap_log(double x) { return safeshape_glibc225_log(x); }
}
