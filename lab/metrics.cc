#include "lab/metrics.h"

#include <array>
#include <exception>
#include <variant>

#include <fmt/format.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/metric_family.h>
#include <prometheus/family.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

namespace aggvm::lab {
namespace {

constexpr std::array<uint64_t, 16> kDefaultBoundsNs = {
    1'000,   2'000,   5'000,     10'000,    20'000,    50'000,     100'000,    200'000,
    500'000, 1'000'000, 2'000'000, 5'000'000, 10'000'000, 20'000'000, 50'000'000, 100'000'000,
};

bool ValidName(const std::string& n, bool label) {
  if (n.empty()) return false;
  for (size_t i = 0; i < n.size(); ++i) {
    const char c = n[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (!label && c == ':');
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return !(label && n.rfind("__", 0) == 0);
}

// Turns a ScrapeFunction's samples into metric families at every scrape, grouped by name in first-seen order.
class FunctionCollectable final : public prometheus::Collectable {
 public:
  explicit FunctionCollectable(ScrapeFunction f) : f_(std::move(f)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    std::map<std::string, size_t> index;
    for (auto& s : f_()) {
      if (!ValidName(s.name, false)) continue;
      bool labels_ok = true;
      for (const auto& [k, v] : s.labels) labels_ok = labels_ok && ValidName(k, true);
      if (!labels_ok) continue;
      const auto type = s.type == ScrapedSample::Type::kCounter ? prometheus::MetricType::Counter
                                                                : prometheus::MetricType::Gauge;
      auto [it, fresh] = index.emplace(s.name, out.size());
      if (fresh) out.push_back(prometheus::MetricFamily{s.name, s.help, type, {}});
      prometheus::MetricFamily& fam = out[it->second];
      if (fam.type != type) continue;  // one name, one type
      prometheus::ClientMetric m;
      for (const auto& [k, v] : s.labels) m.label.push_back({k, v});
      if (type == prometheus::MetricType::Counter) m.counter.value = s.value;
      else m.gauge.value = s.value;
      fam.metric.push_back(std::move(m));
    }
    return out;
  }

 private:
  ScrapeFunction f_;
};

}  // namespace

std::span<const uint64_t> DefaultLatencyBoundsNs() { return kDefaultBoundsNs; }

struct MetricsRegistry::FamilyEntry {
  std::string help;
  std::variant<prometheus::Family<prometheus::Counter>*, prometheus::Family<prometheus::Histogram>*> family;
  // Histograms: the bounds of every series of this family, by labels (one bound set per series).
  std::map<MetricLabels, std::vector<double>> bounds;
};

MetricsRegistry::MetricsRegistry() : registry_(std::make_shared<prometheus::Registry>()) {}
MetricsRegistry::~MetricsRegistry() = default;

absl::StatusOr<CounterHandle> MetricsRegistry::Counter(std::string_view name, std::string_view help,
                                                       const MetricLabels& labels) {
  std::lock_guard lock(mutex_);
  try {
    auto it = families_.find(name);
    if (it == families_.end()) {
      auto& family = prometheus::BuildCounter().Name(std::string(name)).Help(std::string(help)).Register(*registry_);
      auto entry = std::make_unique<FamilyEntry>();
      entry->help = std::string(help);
      entry->family = &family;
      it = families_.emplace(std::string(name), std::move(entry)).first;
    }
    FamilyEntry& e = *it->second;
    auto* family = std::get_if<prometheus::Family<prometheus::Counter>*>(&e.family);
    if (family == nullptr) {
      return absl::AlreadyExistsError(fmt::format("metric '{}' is already registered as a histogram", name));
    }
    if (e.help != help) {
      return absl::AlreadyExistsError(
          fmt::format("metric '{}' is already registered with help '{}' (got '{}')", name, e.help, help));
    }
    return CounterHandle(&(*family)->Add(labels));
  } catch (const std::exception& ex) {
    return absl::InvalidArgumentError(fmt::format("counter '{}': {}", name, ex.what()));
  }
}

absl::StatusOr<LatencyHistogramHandle> MetricsRegistry::LatencyHistogram(std::string_view name,
                                                                         std::string_view help,
                                                                         const MetricLabels& labels,
                                                                         std::span<const uint64_t> bounds_ns) {
  if (bounds_ns.empty()) {
    return absl::InvalidArgumentError(fmt::format("histogram '{}': needs at least one bucket bound", name));
  }
  std::vector<double> bounds;
  for (size_t i = 0; i < bounds_ns.size(); ++i) {
    if (bounds_ns[i] == 0 || (i > 0 && bounds_ns[i] <= bounds_ns[i - 1])) {
      return absl::InvalidArgumentError(
          fmt::format("histogram '{}': bucket bounds must be > 0 and strictly increasing (bound {} is {} ns)", name,
                      i, bounds_ns[i]));
    }
    bounds.push_back(static_cast<double>(bounds_ns[i]) * 1e-9);
  }
  std::lock_guard lock(mutex_);
  try {
    auto it = families_.find(name);
    if (it == families_.end()) {
      auto& family =
          prometheus::BuildHistogram().Name(std::string(name)).Help(std::string(help)).Register(*registry_);
      auto entry = std::make_unique<FamilyEntry>();
      entry->help = std::string(help);
      entry->family = &family;
      it = families_.emplace(std::string(name), std::move(entry)).first;
    }
    FamilyEntry& e = *it->second;
    auto* family = std::get_if<prometheus::Family<prometheus::Histogram>*>(&e.family);
    if (family == nullptr) {
      return absl::AlreadyExistsError(fmt::format("metric '{}' is already registered as a counter", name));
    }
    if (e.help != help) {
      return absl::AlreadyExistsError(
          fmt::format("metric '{}' is already registered with help '{}' (got '{}')", name, e.help, help));
    }
    auto known = e.bounds.find(labels);
    if (known != e.bounds.end() && known->second != bounds) {
      return absl::AlreadyExistsError(
          fmt::format("histogram '{}' already has a series with these labels and other bucket bounds", name));
    }
    auto& h = (*family)->Add(labels, prometheus::Histogram::BucketBoundaries(bounds));
    e.bounds.emplace(labels, std::move(bounds));
    return LatencyHistogramHandle(&h);
  } catch (const std::exception& ex) {
    return absl::InvalidArgumentError(fmt::format("histogram '{}': {}", name, ex.what()));
  }
}

std::string MetricsRegistry::TextExposition() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

MetricsEndpoint::MetricsEndpoint(std::unique_ptr<prometheus::Exposer> exposer, uint16_t port,
                                 std::shared_ptr<prometheus::Collectable> collector)
    : collector_(std::move(collector)), exposer_(std::move(exposer)), port_(port) {}
// The exposer (its civetweb threads) goes first: no scrape can still be running in the collector.
MetricsEndpoint::~MetricsEndpoint() { exposer_.reset(); }

absl::StatusOr<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::Start(const MetricsRegistry& registry,
                                                                        const std::string& bind_address,
                                                                        ScrapeFunction collect) {
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    // One civetweb worker thread is plenty for a scrape every few seconds.
    exposer = std::make_unique<prometheus::Exposer>(bind_address, 1);
  } catch (const std::exception& ex) {
    return absl::UnavailableError(fmt::format(
        "metrics endpoint: cannot listen on '{}' ({}); pick a free port or another address", bind_address, ex.what()));
  }
  const auto ports = exposer->GetListeningPorts();
  if (ports.empty() || ports.front() <= 0 || ports.front() > 65535) {
    return absl::UnavailableError(fmt::format("metrics endpoint: no listening port for '{}'", bind_address));
  }
  exposer->RegisterCollectable(registry.prometheus_registry());
  std::shared_ptr<prometheus::Collectable> collector;
  if (collect) {
    collector = std::make_shared<FunctionCollectable>(std::move(collect));
    exposer->RegisterCollectable(collector);
  }
  return std::unique_ptr<MetricsEndpoint>(
      new MetricsEndpoint(std::move(exposer), static_cast<uint16_t>(ports.front()), std::move(collector)));
}

}  // namespace aggvm::lab
