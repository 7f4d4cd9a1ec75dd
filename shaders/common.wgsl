// Helpers shared by every lockstep kernel.

// The contract's one NaN: any NaN bit pattern becomes 0x7FC00000.
fn canon(x: u32) -> u32 {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) { return 0x7FC00000u; }
    return x;
}
