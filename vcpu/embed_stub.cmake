# cmake -DIN=stub.bin -DOUT=stub.cc -DSYMBOL=name -P embed_stub.cmake: writes `extern const unsigned char SYMBOL[N]`
# with the bytes of IN into OUT (namespace aggvm::vcpu), so the proxy stub ships inside aggvm_vcpu.
file(READ ${IN} hex HEX)
string(LENGTH "${hex}" hex_len)
math(EXPR n "${hex_len} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
file(WRITE ${OUT} "// Generated from ${IN} by vcpu/embed_stub.cmake. Do not edit.\n#include <cstddef>\nnamespace aggvm::vcpu {\nextern const unsigned char ${SYMBOL}[${n}];\nextern const std::size_t ${SYMBOL}_size;\nconst unsigned char ${SYMBOL}[${n}] = {${bytes}};\nconst std::size_t ${SYMBOL}_size = ${n};\n}  // namespace aggvm::vcpu\n")
