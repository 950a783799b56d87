/**
 * Constants of torch's CPU normal sampler: mt19937's sizes and the avx_mathfun float32 log and sincos
 * polynomials its AVX2 Box–Muller uses. One copy for the JS reference (torch-cpu.ts) and the generated
 * WebAssembly (rng-mt-simd.ts), which must agree bit for bit.
 */
const f32 = Math.fround;

export const MT_N = 624;
export const MT_M = 397;

export const TWO_PI_F32 = f32(2 * Math.PI);

export const LOG_SQRTHF = f32(0.7071067811865476);
export const LOG_P = [
  7.0376836292e-2, -1.151461031e-1, 1.167699874e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
  3.3333331174e-1,
].map(f32) as [number, number, number, number, number, number, number, number, number];
export const LOG_Q1 = f32(-2.1219444e-4);
export const LOG_Q2 = f32(0.693359375);

export const FOUR_OVER_PI = f32(1.27323954473516);
export const DP1 = f32(-0.78515625);
export const DP2 = f32(-2.4187564849853515625e-4);
export const DP3 = f32(-3.774894977445941e-8);
export const COS_P0 = f32(2.443315711809948e-5);
export const COS_P1 = f32(-1.388731625493765e-3);
export const COS_P2 = f32(4.166664568298827e-2);
export const SIN_P0 = f32(-1.9515295891e-4);
export const SIN_P1 = f32(8.3321608736e-3);
export const SIN_P2 = f32(-1.6666654611e-1);
