#include "lorart/json.h"

#include "testing.h"

using lorart::json::parse;
using lorart::json::Value;

TEST(scalars) {
  CHECK(parse("null").is_null());
  CHECK(parse(" true ").as_bool() == true);
  CHECK(parse("false").as_bool() == false);
  CHECK(parse("0").as_int() == 0);
  CHECK(parse("-12").as_int() == -12);
  CHECK(parse("9223372036854775807").as_int() == 9223372036854775807LL);
  CHECK(!parse("9223372036854775808").is_integer());  // beyond int64: kept as a double
  CHECK_NEAR(parse("9223372036854775808").as_double(), 9223372036854775808.0, 0);
  CHECK(!parse("1.0").is_integer());
  CHECK_NEAR(parse("1.5e3").as_double(), 1500.0, 0);
  CHECK_NEAR(parse("-0.25E-2").as_double(), -0.0025, 1e-18);
  CHECK(parse("\"a\"").as_string() == "a");
}

TEST(strings_and_escapes) {
  CHECK(parse(R"("\"\\\/\b\f\n\r\t")").as_string() == "\"\\/\b\f\n\r\t");
  CHECK(parse(R"("\u00e9")").as_string() == "\xc3\xa9");
  CHECK(parse(R"("\u20AC")").as_string() == "\xe2\x82\xac");
  CHECK(parse(R"("\ud83d\ude00")").as_string() == "\xf0\x9f\x98\x80");  // surrogate pair -> U+1F600
  CHECK(parse("\"\xf0\x9f\x98\x80\"").as_string() == "\xf0\x9f\x98\x80");  // raw UTF-8 kept
  CHECK_THROWS(parse(R"("\ud83d")"), "high surrogate");
  CHECK_THROWS(parse(R"("\ud83d\u0041")"), "high surrogate");
  CHECK_THROWS(parse(R"("\ude00")"), "unpaired low surrogate");
  CHECK_THROWS(parse(R"("\u12g4")"), "hex digits");
  CHECK_THROWS(parse(R"("\x")"), "invalid escape");
  CHECK_THROWS(parse("\"a\nb\""), "control character");
  CHECK_THROWS(parse("\"abc"), "unterminated string");
  CHECK_THROWS(parse("\"\xc3\""), "UTF-8");
  CHECK_THROWS(parse("\"\xc0\xaf\""), "UTF-8");      // overlong
  CHECK_THROWS(parse("\"\xed\xa0\x80\""), "UTF-8");  // encoded surrogate
}

TEST(containers) {
  Value v = parse(R"( {"b": [1, 2, {"c": null}], "a": {"x": "y"}, "e": []} )");
  const auto& o = v.as_object();
  CHECK(o.size() == 3 && o[0].first == "b" && o[1].first == "a");  // document order
  CHECK(v.find("b")->as_array()[1].as_int() == 2);
  CHECK(v.find("b")->as_array()[2].find("c")->is_null());
  CHECK(v.find("a")->find("x")->as_string() == "y");
  CHECK(v.find("missing") == nullptr);
  CHECK(v.find("e")->as_array().empty());
}

TEST(errors_name_the_byte_offset) {
  CHECK_THROWS(parse(""), "at byte 0: expected a JSON value, got end of input");
  CHECK_THROWS(parse("[1,]"), "at byte 3: expected a JSON value, got ']'");
  CHECK_THROWS(parse("{\"a\":1,}"), "at byte 7: expected a string key");
  CHECK_THROWS(parse("{\"a\" 1}"), "expected ':'");
  CHECK_THROWS(parse("[1 2]"), "at byte 3: expected ',' or ']'");
  CHECK_THROWS(parse("{\"a\":1,\"a\":2}"), "at byte 7: duplicate key \"a\"");
  CHECK_THROWS(parse("01"), "leading zeros");
  CHECK_THROWS(parse("1."), "digit after '.'");
  CHECK_THROWS(parse("1e"), "exponent");
  CHECK_THROWS(parse("-"), "expected a digit");
  CHECK_THROWS(parse("NaN"), "expected a JSON value");
  CHECK_THROWS(parse("tru"), "invalid literal");
  CHECK_THROWS(parse("1e999"), "out of range");
  CHECK_THROWS(parse("{} x"), "at byte 3: unexpected data after the JSON value");
  CHECK_THROWS(parse("// c\n1"), "expected a JSON value");
}

TEST(many_keys_and_late_duplicates) {
  std::string big = "{";
  for (int i = 0; i < 50000; ++i) big += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":0";
  CHECK(parse(big + "}").as_object().size() == 50000);  // linear time: a hash set past 16 keys
  CHECK_THROWS(parse(big + ",\"k49999\":1}"), "duplicate key \"k49999\"");
  CHECK_THROWS(parse(big + ",\"k3\":1}"), "duplicate key \"k3\"");
  std::string small = "{";
  for (int i = 0; i < 16; ++i) small += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":0";
  CHECK_THROWS(parse(small + ",\"k0\":1}"), "duplicate key \"k0\"");    // 17th key, set built at 16
  CHECK_THROWS(parse(small + ",\"k15\":1}"), "duplicate key \"k15\"");
  CHECK_THROWS(parse("{\"a\":0,\"b\":0,\"c\":0,\"d\":0,\"e\":0,\"f\":0,\"g\":0,\"h\":0,\"i\":0,\"j\":0,"
                     "\"k\":0,\"l\":0,\"m\":0,\"n\":0,\"o\":0,\"a\":1}"), "duplicate key \"a\"");  // the 16th key
}

TEST(depth_limit) {
  std::string ok(64, '['), okc(64, ']');
  CHECK(parse(ok + okc).is_array());
  std::string deep(65, '['), deepc(65, ']');
  CHECK_THROWS(parse(deep + deepc), "nesting deeper than 64");
  std::string huge(100000, '[');  // never recurses past the limit
  CHECK_THROWS(parse(huge), "nesting deeper");
  lorart::json::ParseOptions o;
  o.max_depth = 2;
  CHECK_THROWS(parse("[[[]]]", o), "nesting deeper than 2");
  lorart::json::ParseOptions v;
  v.max_values = 4;
  CHECK(parse("[1,2,3]", v).as_array().size() == 3);
  CHECK_THROWS(parse("[1,2,3,{}]", v), "at byte 7: more than 4 values");
}

TEST(typed_accessors_name_what_and_got) {
  Value v = parse("{\"r\": \"8\"}");
  CHECK_THROWS(v.find("r")->as_int("field r"), "field r: expected a JSON integer, got string");
  CHECK_THROWS(parse("1.5").as_int("n"), "expected a JSON integer, got number");
}

TEST(dump_roundtrip) {
  const char* text = R"({"a":[1,-2,0.5,1e-07,true,false,null],"s":"q\"\\\n\u0001é","o":{}})";
  Value v = parse(text);
  std::string d = lorart::json::dump(v);
  CHECK(d == R"({"a":[1,-2,0.5,1e-07,true,false,null],"s":"q\"\\\n\u0001é","o":{}})");
  CHECK(lorart::json::dump(parse(d)) == d);
  CHECK(lorart::json::dump(Value(0.1)) == "0.1");
  CHECK(lorart::json::dump(Value(2.0)) == "2.0");
  CHECK(lorart::json::dump(Value(-0.0)) == "-0.0");
  CHECK(lorart::json::dump(Value(1e300)) == "1e+300");
  CHECK(lorart::json::dump(Value(1.0 / 3.0)) == "0.3333333333333333");
  Value o;
  o.set("k", Value(int64_t(3)));
  o.set("k", Value("v"));
  CHECK(lorart::json::dump(o) == "{\"k\":\"v\"}");
  CHECK_THROWS(lorart::json::dump(Value(std::nan(""))), "non-finite");
}

TEST_MAIN()
