import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;

/** Exit 0 when the broker named by --bootstrap-server answers describeCluster within a few seconds. */
public final class ApiVersionsCheck {
    public static void main(String[] args) throws Exception {
        String bootstrap = args.length > 0 ? args[args.length - 1] : "localhost:9092";
        Properties props = new Properties();
        props.put("bootstrap.servers", bootstrap);
        props.put("request.timeout.ms", "5000");
        props.put("default.api.timeout.ms", "8000");
        try (Admin admin = Admin.create(props)) {
            admin.describeCluster().nodes().get();
        }
    }
}
