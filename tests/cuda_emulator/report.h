// The line a harness prints per case: each checked tensor's worst error ratio, and whether all were within bounds.
#pragma once

#include <cstdio>
#include <string>

struct Report {
  bool ok = true;
  std::string text;
  // check: anything with a name, the worst ratio of its elements' errors to their bound, and whether all were in it.
  template <typename Check>
  void add(const Check& check) {
    char buf[64];
    std::snprintf(buf, sizeof buf, " %s %.2f%s", check.name, check.worst, check.ok ? "" : "(FAIL)");
    text += buf;
    ok = ok && check.ok;
  }
};
