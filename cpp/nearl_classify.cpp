// nearl_classify: classify image files with a package written by `python -m nearl_model.export`.
//
//   nearl_classify [--json] MODEL.pt2 IMAGE_OR_FOLDER [...]
//
// The package carries its classes and preprocessing as AOTInductor metadata
// (nearl.* keys, the same values as the JSON beside it). Each image is decoded
// (PNG with libpng, JPEG with libjpeg), scaled to [0, 1] by its storage type,
// resized with torch's antialiased bilinear interpolation and normalised:
// the same torch ops, in the same order, as nearl_model.data.preprocess.
//
// Exit codes: 0 done, 2 bad input (usage, a missing or unreadable file, a
// package nearl did not write), with the reason on stderr in one line.

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <jpeglib.h>
#include <png.h>

#include <algorithm>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

// A user-facing failure: printed as one "error: ..." line, exit code 2.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What the package says about its inputs and outputs (nearl_model/export.py: package_metadata).
struct PackageInfo {
  std::vector<std::string> classes;
  int64_t height = 0, width = 0, channels = 3, max_batch = 1;
  std::vector<double> mean, std;
  std::string device;
};

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, sep)) parts.push_back(part);
  return parts;
}

std::vector<double> numbers(const std::string& key, const std::string& text) {
  std::vector<double> values;
  for (const auto& part : split(text, ',')) {
    char* end = nullptr;
    double v = std::strtod(part.c_str(), &end);
    if (part.empty() || *end != '\0')
      throw UserError("package metadata " + key + " = '" + text + "' is not a list of numbers");
    values.push_back(v);
  }
  return values;
}

PackageInfo read_info(const std::string& path,
                      const std::unordered_map<std::string, std::string>& meta) {
  auto get = [&](const std::string& key) {
    auto it = meta.find("nearl." + key);
    if (it == meta.end())
      throw UserError("'" + path + "' has no nearl." + key + " metadata: it was not written by "
                      "python -m nearl_model.export");
    return it->second;
  };
  if (get("format") != "nearl-export-v1")
    throw UserError("'" + path + "' is a " + get("format") + " package; this nearl_classify reads nearl-export-v1");
  PackageInfo info;
  info.classes = split(get("classes"), '\n');
  auto size = numbers("image_size", get("image_size"));
  info.mean = numbers("mean", get("mean"));
  info.std = numbers("std", get("std"));
  info.channels = static_cast<int64_t>(numbers("channels", get("channels")).at(0));
  info.max_batch = static_cast<int64_t>(numbers("max_batch", get("max_batch")).at(0));
  info.device = get("device");
  if (size.size() != 2 || info.classes.size() < 2 || info.mean.size() != 3 || info.std.size() != 3 ||
      info.max_batch < 1)
    throw UserError("'" + path + "' has malformed nearl.* metadata (image_size, classes, mean, std or max_batch)");
  info.height = static_cast<int64_t>(size[0]);
  info.width = static_cast<int64_t>(size[1]);
  return info;
}

// ---- decoding: (H, W, C) uint8 or uint16 pixels, C in 1..4, as PIL gives them to nearl_model ----

// libpng reports errors by longjmp, not by exceptions (it is C): the message is kept here.
struct PngError {
  std::string message;
};

void png_fail(png_structp png, png_const_charp message) {
  static_cast<PngError*>(png_get_error_ptr(png))->message = message;
  png_longjmp(png, 1);
}

void png_quiet(png_structp, png_const_charp) {}

at::Tensor decode_png(const std::string& path) {
  FILE* file = std::fopen(path.c_str(), "rb");
  if (!file) throw UserError("cannot open image '" + path + "'");
  PngError err;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &err, png_fail, png_quiet);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  at::Tensor pixels;
  std::vector<png_bytep> rows;
  if (!info || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    std::fclose(file);
    throw UserError("cannot read image '" + path + "': " + (err.message.empty() ? "out of memory" : err.message));
  }
  png_init_io(png, file);
  png_read_info(png, info);
  const int depth = png_get_bit_depth(png, info);
  const int color = png_get_color_type(png, info);
  // Palettes and low-bit grey become 8-bit; transparency chunks are ignored (nearl drops alpha).
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  // 16-bit grey keeps its full range (PIL's I;16); 16-bit colour keeps its high byte, as PIL's RGB does.
  const bool sixteen = depth == 16 && color == PNG_COLOR_TYPE_GRAY;
  if (depth == 16 && !sixteen) png_set_strip_16(png);
  if (sixteen) png_set_swap(png);  // PNG stores big-endian; the tensor holds host order (little-endian)
  png_read_update_info(png, info);
  const int64_t h = png_get_image_height(png, info), w = png_get_image_width(png, info);
  const int64_t c = png_get_channels(png, info);
  pixels = at::empty({h, w, c}, sixteen ? at::kUInt16 : at::kByte);
  const size_t row_bytes = png_get_rowbytes(png, info);
  rows.resize(h);
  for (int64_t y = 0; y < h; ++y) rows[y] = static_cast<png_bytep>(pixels.data_ptr()) + y * row_bytes;
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  std::fclose(file);
  // Grey + alpha is read by PIL as grey (alpha dropped): keep the first channel.
  return c == 2 ? pixels.narrow(2, 0, 1) : pixels;
}

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

at::Tensor decode_jpeg(const std::string& path) {
  FILE* file = std::fopen(path.c_str(), "rb");
  if (!file) throw UserError("cannot open image '" + path + "'");
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  at::Tensor pixels;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    std::fclose(file);
    throw UserError("cannot read image '" + path + "': " + err.message);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_stdio_src(&cinfo, file);
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    std::fclose(file);
    throw UserError("image '" + path + "' is a CMYK JPEG; convert it to RGB first");
  }
  cinfo.out_color_space = cinfo.num_components == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  pixels = at::empty({cinfo.output_height, cinfo.output_width, cinfo.output_components}, at::kByte);
  const size_t row_bytes = static_cast<size_t>(cinfo.output_width) * cinfo.output_components;
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = static_cast<JSAMPROW>(pixels.data_ptr()) + cinfo.output_scanline * row_bytes;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  std::fclose(file);
  return pixels;
}

std::string lower_extension(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char ch) { return std::tolower(ch); });
  return ext;
}

bool is_image(const fs::path& path) {
  const std::string ext = lower_extension(path.string());
  return (ext == ".png" || ext == ".jpg" || ext == ".jpeg") && path.filename().string()[0] != '.';
}

at::Tensor decode(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw UserError("image file '" + path + "' does not exist");
  if (!fs::is_regular_file(path, ec)) throw UserError("image file '" + path + "' is not a regular file");
  const std::string ext = lower_extension(path);
  if (ext == ".png") return decode_png(path);
  if (ext == ".jpg" || ext == ".jpeg") return decode_jpeg(path);
  throw UserError("image '" + path + "': nearl_classify reads .png, .jpg and .jpeg files");
}

// nearl_model.data.images.preprocess, op for op: scale by the storage range, first three channels, grey
// repeated, antialiased bilinear resize, normalise.
at::Tensor preprocess(const at::Tensor& pixels, const PackageInfo& info) {
  const double full_scale = pixels.scalar_type() == at::kUInt16 ? 65535.0 : 255.0;
  at::Tensor t = pixels.to(at::kFloat) / full_scale;
  t = t.narrow(2, 0, std::min<int64_t>(3, t.size(2))).permute({2, 0, 1});
  if (t.size(0) == 1) t = t.expand({3, t.size(1), t.size(2)});
  // What torch.nn.functional.interpolate(mode="bilinear", antialias=True, size=...) calls.
  t = at::_upsample_bilinear2d_aa(t.unsqueeze(0), {info.height, info.width}, /*align_corners=*/false,
                                  std::nullopt, std::nullopt)[0];
  at::Tensor mean = at::tensor(info.mean, at::kDouble).to(at::kFloat).view({3, 1, 1});
  at::Tensor std = at::tensor(info.std, at::kDouble).to(at::kFloat).view({3, 1, 1});
  return (t - mean) / std;
}

std::string json_string(const std::string& s) {
  std::ostringstream out;
  out << '"';
  for (unsigned char ch : s) {
    if (ch == '"' || ch == '\\') out << '\\' << ch;
    else if (ch < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      out << buf;
    } else out << ch;
  }
  out << '"';
  return out.str();
}

// %.9g prints a float32 so that it reads back to the same float.
std::string json_numbers(const at::Tensor& row) {
  std::ostringstream out;
  out << '[';
  auto values = row.accessor<float, 1>();
  for (int64_t i = 0; i < row.size(0); ++i) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", values[i]);
    out << (i ? ", " : "") << buf;
  }
  out << ']';
  return out.str();
}

std::vector<std::string> list_images(const std::vector<std::string>& args) {
  std::vector<std::string> images;
  for (const auto& arg : args) {
    std::error_code ec;
    if (fs::is_directory(arg, ec)) {
      std::vector<std::string> found;
      for (const auto& entry : fs::directory_iterator(arg))
        if (entry.is_regular_file() && is_image(entry.path())) found.push_back(entry.path().string());
      if (found.empty()) throw UserError("folder '" + arg + "' holds no .png, .jpg or .jpeg files");
      std::sort(found.begin(), found.end());
      images.insert(images.end(), found.begin(), found.end());
    } else {
      images.push_back(arg);
    }
  }
  return images;
}

int run(int argc, char** argv) {
  bool json = false;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json") json = true;
    else if (arg == "-h" || arg == "--help") {
      std::cout << "usage: nearl_classify [--json] MODEL.pt2 IMAGE_OR_FOLDER [...]\n"
                   "Classify PNG/JPEG images with a package from python -m nearl_model.export.\n";
      return 0;
    } else if (arg.rfind("--", 0) == 0) throw UserError("unknown option " + arg + " (try --help)");
    else positional.push_back(arg);
  }
  if (positional.size() < 2) throw UserError("usage: nearl_classify [--json] MODEL.pt2 IMAGE_OR_FOLDER [...]");
  const std::string model_path = positional[0];
  std::error_code ec;
  if (!fs::is_regular_file(model_path, ec)) throw UserError("package '" + model_path + "' does not exist");
  const auto images = list_images({positional.begin() + 1, positional.end()});

  std::unordered_map<std::string, std::string> meta;
  try {
    meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(model_path, "model");
  } catch (const std::exception& err) {
    throw UserError("'" + model_path + "' is not a readable AOTInductor package: " +
                    split(err.what(), '\n').at(0));
  }
  const PackageInfo info = read_info(model_path, meta);
  // Every image is decoded and checked before the model runs.
  std::vector<at::Tensor> inputs;
  for (const auto& path : images) inputs.push_back(preprocess(decode(path), info));

  torch::inductor::AOTIModelPackageLoader loader(model_path);
  const at::Device device(info.device == "cuda" ? at::kCUDA : at::kCPU);
  std::vector<at::Tensor> logits, probs;
  for (size_t start = 0; start < inputs.size(); start += info.max_batch) {
    const size_t end = std::min(inputs.size(), start + static_cast<size_t>(info.max_batch));
    at::Tensor batch = at::stack(std::vector<at::Tensor>(inputs.begin() + start, inputs.begin() + end)).to(device);
    auto outputs = loader.run({batch});
    logits.push_back(outputs.at(0).to(at::kCPU).contiguous());
    probs.push_back(outputs.at(1).to(at::kCPU).contiguous());
  }
  const at::Tensor all_logits = at::cat(logits), all_probs = at::cat(probs);

  if (json) std::cout << "{\"model\": " << json_string(model_path) << ", \"classes\": [";
  for (size_t k = 0; json && k < info.classes.size(); ++k) std::cout << (k ? ", " : "") << json_string(info.classes[k]);
  if (json) std::cout << "], \"images\": [";
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor row = all_probs[i];
    const int64_t best = row.argmax().item<int64_t>();
    const float p = row[best].item<float>();
    if (json) {
      std::cout << (i ? ", " : "") << "\n  {\"path\": " << json_string(images[i]) << ", \"class\": "
                << json_string(info.classes.at(best)) << ", \"index\": " << best << ", \"probabilities\": "
                << json_numbers(row) << ", \"logits\": " << json_numbers(all_logits[i]) << "}";
    } else {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.3f", p);
      std::cout << images[i] << ": " << info.classes.at(best) << " (" << buf << ")\n";
    }
  }
  if (json) std::cout << "\n]}\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UserError& err) {
    std::cerr << "error: " << err.what() << std::endl;
    return 2;
  } catch (const std::exception& err) {
    // torch's errors carry a C++ backtrace after the first line.
    std::cerr << "error: " << split(err.what(), '\n').at(0) << std::endl;
    return 2;
  }
}
