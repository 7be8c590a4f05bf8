/* Vector helpers shared by _native.c and _conv.c (_native.py hashes this file with them). */
#ifndef SPARSELEARN_SIMD_H
#define SPARSELEARN_SIMD_H

/* A 16-float vector (one AVX-512 register, two AVX2 ones) that may sit at any float address:
 * GCC/Clang vector extensions give the compiler explicit vectors whatever it decides about loops. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* Sum of the 16 lanes in four shuffle-add steps. A scalar loop is a 16-add dependency chain: in the
 * lane weight gradients, which sum once per entry and band, it cost 1.1-1.5x their time. */
static inline float hsum16(v16 v)
{
    typedef int v16i __attribute__((vector_size(64)));
    v += __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v += __builtin_shuffle(v, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v += __builtin_shuffle(v, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
}

#endif
